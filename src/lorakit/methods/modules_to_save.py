"""`ModulesToSaveWrapper`: a whole module trained as a per-adapter copy (PEFT's `modules_to_save`).

Used for parts a low-rank update does not fit, typically a freshly initialised
classification head. The original stays frozen; each adapter owns a full trainable copy
(`modules_to_save.<name>`), which is what gets saved. Names mirror PEFT's wrapper, so
state-dict keys (`classifier.modules_to_save.default.weight`) match. Which copy runs is
read from the model's `AdapterSet` (active adapters, disabled), shared with the adapted layers.

Unlike a LoRA layer's banked factors, a copy is a module: loading an adapter that has one
adds `modules_to_save.<name>` to the tree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorakit.adapters import AdapterSet, SharesAdapterSet
from lorakit.routing import current_routing


class ModulesToSaveWrapper(SharesAdapterSet, nn.Module):
    def __init__(self, original_module: nn.Module, adapter_set: AdapterSet | None = None):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.adapter_set = adapter_set if adapter_set is not None else AdapterSet()

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def update(self, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """Add adapter `name`'s copy: of the original, or with `state` (a loaded or blended copy)."""
        module = copy.deepcopy(self.original_module)
        if state is not None:
            module.load_state_dict(state, strict=True)
        self.modules_to_save[name] = module
        self.original_module.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def set_trainable(self, names: Sequence[str], trainable: bool) -> None:
        """Only the copy that runs for `names` trains (the set's active adapters are set by the model)."""
        running = next((a for a in names if a in self.modules_to_save), None)
        for name in self.modules_to_save:
            self.set_requires_grad(name, trainable and name == running)

    def set_requires_grad(self, name: str, requires_grad: bool) -> None:
        if name in self.modules_to_save:
            self.modules_to_save[name].requires_grad_(requires_grad)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from (self.modules_to_save[name].parameters() if name in self.modules_to_save else ())

    def _active_copy_name(self) -> str | None:
        """PEFT's rule: the first active adapter that has a copy here (copies replace, they do not stack)."""
        return next((a for a in self.active_adapters if a in self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        name = self._active_copy_name()
        return self.original_module if self.disable_adapters or name is None else self.modules_to_save[name]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `.weight` read by HF code on a wrapped embedding or head
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        routing = current_routing()
        if routing is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        # Per-row (or per-token) choice: entries without a copy here (or "__base__") use the original module.
        result = self.original_module(x, *args, **kwargs)
        if routing.per_token:  # tokens of a packed [1, T] batch: entries of the flattened batch
            routing.tokens_per_entry(x.shape[0], x.shape[:-1].numel() if x.is_floating_point() else x.numel())
            flat_x = x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1)
            flat = result.reshape(-1, result.shape[-1])
            return self._replace_rows(flat_x, flat, routing, *args, **kwargs).view(result.shape)
        routing.tokens_per_entry(x.shape[0], x.shape[0])
        return self._replace_rows(x, result, routing, *args, **kwargs)

    def _replace_rows(self, x: torch.Tensor, result: torch.Tensor, routing, *args, **kwargs) -> torch.Tensor:
        for name, rows in routing.groups(x.device).items():
            if name in self.modules_to_save:
                out = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, out.to(result.dtype))
        return result
