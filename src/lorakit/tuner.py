"""`AdapterModel` (PEFT's name for it, for LoRA: `LoraModel`): the model's module tree with adapters of any
method in it — wrapping, and what runs over every layer.

It holds the user's model as `.model` (so parameter names read
`base_model.model.<module path>…`, exactly PEFT's) and the model's `AdapterSet`, which
every layer it wraps shares. Modules are wrapped once, when an adapter first targets them
(or up front: `reserve`); after that, adding and deleting adapters writes into the layers'
weight banks and never changes the tree — deleting the last adapter of a layer leaves it
wrapped (as PEFT does). Only `unwrap` (merge_and_unload / unload) takes wrappers out.
Every check that can fail runs before the first module is replaced, so a bad config leaves
the model untouched.

Also here, because they walk every layer: merging all-or-nothing, and which parameters train.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.adapters import AdapterSet
from lorakit.errors import AdapterStateError
from lorakit.files.tensors import LoadPlan, adapter_tensors, apply_biases
from lorakit.fused_loss import causal_lm_loss_forward, fused_loss_applies
from lorakit.methods import inner_module, layer_chain, layer_of
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.modules_to_save import ModulesToSaveWrapper
from lorakit.methods.table import acts_on_inputs, method_of
from lorakit.methods.virtual_tokens.encoders import VirtualTokenEncoders
from lorakit.methods.virtual_tokens.inputs import RowTokens, extend_call, generate_extended
from lorakit.routing import Routing, adapter_routing, current_routing, gradient_checkpointing_on
from lorakit.targets import find_modules_to_save, find_target_modules, named_candidates


class AdapterModel(nn.Module):
    def __init__(self, model: nn.Module, adapter_set: AdapterSet):
        super().__init__()
        self.model = model
        self.adapter_set = adapter_set
        self.prompt_encoder = VirtualTokenEncoders()  # virtual-token adapters (prompt/prefix tuning), by name
        self.method_state: dict[str, object] = {}  # what a method keeps across steps (AdaLoRA's allocators)
        # A serving model (PeftModel.for_serving) may wrap new modules while its engine runs: the write lock
        # waits for the step in flight and holds the next back, and an engine step reads the tree afresh.
        self.wrap_between_forwards = False

    def forward(self, input_ids=None, labels=None, **kwargs):
        """The wrapped model's forward. A causal LM's training call (labels, grad on, train mode) takes the
        fast path's loss (fused_loss.py: no full logits, so `logits` is None) unless the fast path is off.
        The first input goes positionally, so a plain `nn.Module` base still gets `model(x)`.
        Rows with virtual-token adapters get their tokens first (virtual_tokens/inputs.py)."""
        rows = self.virtual_rows(input_ids if input_ids is not None else kwargs.get("inputs_embeds"))
        if rows is not None:
            input_ids, labels, kwargs = extend_call(self.model, rows, input_ids, labels, kwargs)
        if self.adapter_set.fast_path and fused_loss_applies(self.model, labels, kwargs):
            out = causal_lm_loss_forward(self.model, input_ids, labels, kwargs)
        else:
            if labels is not None:
                kwargs["labels"] = labels
            out = self.model(*((input_ids,) if input_ids is not None else ()), **kwargs)
        return self._add_loss_terms(out)

    def _add_loss_terms(self, out):
        """Add what a method puts in the loss (AdaLoRA's orthogonality term, as PEFT adds it to any loss)."""
        if not isinstance(getattr(out, "loss", None), torch.Tensor):
            return out
        for name in self.adapter_set.active:
            config = self.adapter_set.configs.get(name)
            term_of = getattr(method_of(config), "loss_term", None) if config is not None else None
            if term_of is not None and not config.inference_mode:
                term = term_of(self.model, name, config)
                if term is not None:
                    out.loss = out.loss + term
        return out

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's AdaLoRA step (after optimizer.step(), before zero_grad()): for each training adapter whose
        method re-allocates ranks, update importance scores and prune to the step's budget."""
        for name, config in self.adapter_set.configs.items():
            step_of = getattr(method_of(config), "update_and_allocate", None)
            if step_of is not None and not config.inference_mode:
                step_of(self.model, self.layers_holding(name), name, config, global_step, self.method_state)

    def layers_holding(self, name: str) -> dict[str, AdapterLayer]:
        """{module path: the layer on it that holds adapter `name`}."""
        return {path: layer for path, m in named_candidates(self.model) for layer in layer_chain(m) if layer.holds(name)}

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The wrapped model's generate under one routing for every step (each row repeated for beams
        and returned sequences, as generate repeats the rows)."""
        if adapter_names is not None:
            config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
            returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
            adapter_names = [n for n in adapter_names for _ in range(max(beams, returns))]
        with self.running(adapter_names):
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            rows = self.virtual_rows(input_ids if input_ids is not None else kwargs.get("inputs_embeds"))
            if rows is None:
                return self.model.generate(*args, **kwargs) if args else self.model.generate(input_ids=input_ids, **kwargs)
            return generate_extended(self.model, rows, input_ids, args[1:], kwargs)

    def virtual_rows(self, inputs) -> list[RowTokens | None] | None:
        """Each row's virtual-token adapter for this call (from the routing, else the active adapters),
        or None when no row has one."""
        if not len(self.prompt_encoder) or inputs is None or self.adapter_set.disabled:
            return None
        routing = current_routing()
        if routing is None:
            virtual = [name for name in self.adapter_set.active if name in self.prompt_encoder]
            if len(virtual) > 1:
                raise AdapterStateError(f"Active adapters {virtual} are all virtual-token adapters; a row takes one "
                                        "(stack one with layer adapters such as LoRA instead).")
            names = virtual[:1] * inputs.shape[0]
        else:
            if routing.per_token and any(name in self.prompt_encoder for name in routing.names):
                raise AdapterStateError("Virtual-token adapters choose per row (adapter_names=[...] per row), not per "
                                        "token of a packed batch (unless the caller places them: forward_packed).")
            names = routing.names
        rows = [RowTokens(self.prompt_encoder[n], self.adapter_set.configs[n]) if n in self.prompt_encoder else None
                for n in names]
        return rows if any(rows) else None

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, routing: Routing,
                       logits_to_keep: torch.Tensor | None, placed_embeddings) -> object:
        """PeftModel.forward_packed: the wrapped model on one packed row under `routing`, nothing inserted."""
        call = {"position_ids": position_ids, "use_cache": False, "logits_to_keep": logits_to_keep}
        with self.running(routing):
            if placed_embeddings is None:
                return self.model(input_ids=input_ids, **call)
            rows, vectors = placed_embeddings  # embedded under the routing: an adapter on the embeddings applies
            embeds = self.model.get_input_embeddings()(input_ids)
            return self.model(inputs_embeds=embeds.index_copy(1, rows, vectors[None].to(embeds.dtype)), **call)

    def virtual_tokens(self, name: str) -> tuple[str, torch.Tensor, object] | None:
        """(places, tokens, config) of a virtual-token adapter, None for any other: for a packer that puts
        them in place itself (the engine)."""
        if name not in self.prompt_encoder:
            return None
        with torch.no_grad():
            encoder = self.prompt_encoder[name]
            return encoder.places, encoder.virtual_tokens().detach(), self.adapter_set.configs[name]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapter_set"):
                raise
            return getattr(self.model, name)

    # -- what is in the tree ---------------------------------------------------------------
    def adapter_layers(self) -> list[AdapterLayer]:
        return [m for m in self.model.modules() if isinstance(m, AdapterLayer)]

    def saved_module_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    def tuner_modules(self) -> list[AdapterLayer | ModulesToSaveWrapper | VirtualTokenEncoders]:
        """Everything that holds adapters: adapted layers, saved-module wrappers, the virtual-token encoders."""
        return [m for _, m in self.named_tuner_modules()] + [self.prompt_encoder]

    def named_tuner_modules(self) -> list[tuple[str, AdapterLayer | ModulesToSaveWrapper]]:
        """(name, module) of adapted layers and saved-module wrappers, named as PEFT names them ("model.…")."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]

    # -- in ----------------------------------------------------------------------------------
    def _targets(self, config: Any, plan: LoadPlan | None) -> tuple[list[str], list[str]]:
        if plan is not None:  # already resolved and checked against this model
            return list(plan.layers), list(plan.saved_modules)
        return (find_target_modules(self.model, config),
                find_modules_to_save(self.model, config.modules_to_save or []))

    def unwrapped_targets(self, config: Any, plan: LoadPlan | None = None) -> list[str]:
        """The modules `config` targets that are not wrapped yet (adding it would change the tree)."""
        if acts_on_inputs(config):
            return []
        targets, to_save = self._targets(config, plan)
        modules = dict(named_candidates(self.model))
        return ([n for n in targets if layer_of(modules[n], config.peft_type) is None]
                + [n for n in to_save if not isinstance(modules[n], ModulesToSaveWrapper)])

    def reserve(self, config: Any) -> list[str]:
        """Wrap every module `config` targets now, adding no adapter (returns the newly wrapped ones)."""
        targets, _ = self._targets(config, None)
        with self.adapter_set.lock.writing():
            fresh = self._wrap(config, targets)
            for name, layer in fresh.items():
                self._replace(name, layer)
        return list(fresh)

    def _wrap(self, config: Any, targets: list[str]) -> dict[str, AdapterLayer]:
        """New layers for the targets that hold no layer of this method yet (wrapped around whatever is there:
        a plain module, or another method's layer — see methods.layer_chain); checks first, changes nothing."""
        method = method_of(config)
        modules = dict(named_candidates(self.model))
        method.check_targets(modules, targets, config)
        fresh = {n: method.new_layer(modules[n], config) for n in targets
                 if layer_of(modules[n], config.peft_type) is None}
        for layer in fresh.values():
            layer.adapter_set = self.adapter_set
        return fresh

    def install(self, adapter_name: str, config: Any, plan: LoadPlan | None = None) -> None:
        """Add a resolved config's adapter (with a checked file's tensors, if `plan`) under the set's write
        lock. Wrapping new modules changes the tree, so that is refused while a forward is running (a serving
        model waits for it instead: `wrap_between_forwards`)."""
        adapters = self.adapter_set
        new_modules = self.unwrapped_targets(config, plan)
        if new_modules and adapters.configs and adapters.lock.busy() and not self.wrap_between_forwards:
            raise AdapterStateError(
                f"Adapter {adapter_name!r} targets modules not wrapped yet ({', '.join(new_modules[:3])}"
                f"{', …' if len(new_modules) > 3 else ''}); wrapping them changes the module tree, which cannot happen "
                "while a forward is running. Load it when the model is idle, or wrap its targets up front with "
                "model.reserve_targets(config)."
            )
        with adapters.lock.writing():
            first = not adapters.configs
            if acts_on_inputs(config):
                tensors = plan.model_tensors if plan is not None else None
                self.prompt_encoder[adapter_name] = method_of(config).new_encoder(self.model, config, tensors)
            else:
                self.inject(config, adapter_name, plan)
            if plan is not None and plan.biases:
                apply_biases(self.model, plan.biases)
            adapters.add(adapter_name, config)
            if first:  # freeze once, at wrap time: later adds leave what the user unfroze alone
                adapters.active = [adapter_name]
                self.freeze_base([config.bias] if adapters.trainable() else [])
                self.set_trainable([adapter_name], adapters.trainable())
            else:  # a new adapter is inactive, so it does not train (its saved-module copies start frozen)
                self.set_requires_grad([adapter_name], False)

    def inject(self, config: Any, adapter_name: str, plan: LoadPlan | None = None) -> None:
        """Add adapter `adapter_name` to every module `config` targets (validated first).

        With a `plan` (a checked adapter file), layers take its tensors instead of an init.
        The method (methods/registry.py) wraps modules and adds the adapter; this only walks the tree.
        """
        method = method_of(config)
        targets, to_save = self._targets(config, plan)
        fresh = self._wrap(config, targets)
        modules = dict(named_candidates(self.model))
        for name in targets:  # from here on nothing raises on a config error
            layer = fresh.get(name) or layer_of(modules[name], config.peft_type)
            method.add_adapter(layer, adapter_name, config, name, plan.layers[name] if plan else None)
            if name in fresh:
                self._replace(name, layer)
        for name in to_save:
            wrapper = modules[name]
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper, self.adapter_set)
                self._replace(name, wrapper)
            wrapper.update(adapter_name, plan.saved_modules[name] if plan else None)

    def saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes for one adapter, under PEFT's names."""
        config = self.adapter_set.configs[adapter_name]
        if acts_on_inputs(config):
            return method_of(config).model_tensors(self.prompt_encoder[adapter_name])
        return adapter_tensors(self.model, adapter_name, config)

    def live_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's parameters under its file names, to copy a checkpoint into (resume)."""
        config = self.adapter_set.configs[adapter_name]
        if not acts_on_inputs(config):
            tensors = adapter_tensors(self.model, adapter_name, config)
            if not all(isinstance(t, nn.Parameter) for t in tensors.values()):
                raise AdapterStateError(f"Adapter {adapter_name!r} ({config.peft_type}) is saved in a reduced form "
                                        "(AdaLoRA: the kept ranks only), which a run cannot resume from; the "
                                        "allocator's scores are not in a checkpoint either. Start the run again.")
            return tensors
        encoder = self.prompt_encoder[adapter_name]
        if len(list(encoder.parameters())) != 1:
            raise AdapterStateError(f"Adapter {adapter_name!r} ({config.peft_type}) trains an encoder whose weights "
                                    "PEFT's file does not hold (only its output); a run cannot resume from it. Start "
                                    "the run again, or load the saved adapter and train its tokens on.")
        return {name: encoder.embedding.weight for name in method_of(config).model_tensors(encoder)}

    # -- out ---------------------------------------------------------------------------------
    def remove_adapter(self, adapter_name: str) -> None:
        """Drop one adapter from every layer and the set; the layers stay wrapped (the tree does not change)."""
        if adapter_name in self.merged_names():
            raise AdapterStateError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        with self.adapter_set.lock.writing():
            for module in self.tuner_modules():
                if adapter_name in module.adapters:
                    module.delete_adapter(adapter_name)
            self.adapter_set.remove(adapter_name)
        self.set_trainable(self.adapter_set.active, self.adapter_set.trainable())

    def unwrap(self, keep_trained_copies: bool) -> nn.Module:
        """Replace every wrapper by what it wraps; return the plain model.

        Adapted layers give back their base layer as it is now (merged or not). Saved-module
        wrappers give back the active trained copy (`keep_trained_copies`, as after a merge)
        or the untouched original.
        """
        for name, module in list(named_candidates(self.model)):
            if isinstance(module, AdapterLayer):
                if not keep_trained_copies:
                    for layer in layer_chain(module):
                        layer.restore_base()  # PiSSA/OLoRA moved part of W into the adapter
                self._replace(name, inner_module(module))
            elif isinstance(module, ModulesToSaveWrapper):
                self._replace(name, module.active_module() if keep_trained_copies else module.original_module)
        return self.model

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)

    # -- across every layer -------------------------------------------------------------------
    def merged_names(self) -> set[str]:
        """Adapters merged into the weights of at least one layer."""
        return {name for layer in self.adapter_layers() for name in layer.merged_adapters}

    def merge(self, names: Sequence[str], safe_merge: bool, allow_quantized: bool) -> None:
        """Fold `names` into the base weights: every check on every layer before the first weight changes."""
        virtual = [name for name in names if name in self.prompt_encoder]
        if virtual:
            raise method_of(self.adapter_set.configs[virtual[0]]).refuse_merge(virtual[0])
        layers = self.adapter_layers()
        for layer in layers:
            layer.check_merge(names, check_finite=safe_merge, allow_quantized=allow_quantized)
        with self.adapter_set.lock.writing():
            lost = [share for layer in layers
                    if (share := layer.merge(names, checked=True, allow_quantized=allow_quantized)) is not None]
            self.adapter_set.merged |= self.merged_names()
        if lost:
            warnings.warn(
                f"Merged into {len(lost)} quantized layers by dequantize -> merge -> requantize: the requantized "
                f"weights miss W+ΔW by {sum(lost) / len(lost):.1%} of the adapter's update ΔW on average "
                f"(worst {max(lost):.1%}). That error is now baked into the model; for a faithful merge use "
                "`lorakit merge` with a full-precision base.",
                stacklevel=3,
            )

    def unmerge(self, warn_if_none: bool = False) -> None:
        """Subtract every merged adapter again, newest first, in every layer."""
        if warn_if_none and not self.merged_names():
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=3)
        with self.adapter_set.lock.writing():
            for layer in self.adapter_layers():
                layer.unmerge()
            self.adapter_set.merged.clear()

    def set_trainable(self, names: Sequence[str], trainable: bool) -> None:
        """Only `names`' parameters require grad (and only if `trainable`); others are frozen."""
        for module in self.tuner_modules():
            module.set_trainable(names, trainable)

    def set_requires_grad(self, names: Sequence[str], requires_grad: bool) -> None:
        for module in self.tuner_modules():
            for name in names:
                if name in module.adapters:
                    module.set_requires_grad(name, requires_grad)

    @contextmanager
    def running(self, adapter_names: Sequence[str] | Routing | None) -> Iterator[None]:
        """A forward's context: the set's read lock and, with `adapter_names` (one per row, or a
        per-token `Routing`), that routing, checked."""
        with self.adapter_set.lock.reading():
            if adapter_names is None:
                yield
                return
            routing = self.adapter_set.routing(adapter_names)
            if self.adapter_set.merged:
                raise AdapterStateError("Adapters are merged, so rows cannot choose adapters; call unmerge_adapter() first.")
            if torch.is_grad_enabled() and gradient_checkpointing_on(self.model):
                # Checkpointed blocks are re-run in backward, after this forward's routing is gone:
                # they would recompute with the active adapter and give wrong gradients.
                raise AdapterStateError(
                    "Per-row adapter_names with gradient checkpointing is not supported yet; disable checkpointing "
                    "or run the forward under torch.no_grad()."
                )
            with adapter_routing(routing):
                yield

    def freeze_base(self, bias_rules: Sequence[str]) -> None:
        """Freeze everything but adapters and saved-module copies; then apply the bias rules
        ("all": every bias trains, "lora_only": the biases of adapted layers)."""
        self.model.requires_grad_(False)
        if "all" in bias_rules:
            for pname, param in self.model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    param.requires_grad_(True)
        if "lora_only" in bias_rules:
            for layer in self.adapter_layers():
                if layer.bias is not None:
                    layer.bias.requires_grad_(True)


LoraModel = AdapterModel  # PEFT's name: `model.base_model` is a LoraModel there too
