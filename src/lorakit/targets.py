"""Which modules of a model an adapter config targets, by PEFT's matching rules.

- a list of names: a module matches if its full name equals a name or ends with ".name";
- a string: a regex that must match the full module name (`re.fullmatch`);
- "all-linear": every Linear/Conv1D except the output head (and, for SEQ_CLS, the classifier);
- `exclude_modules` uses the same rules and wins; modules inside `modules_to_save` are skipped;
- `layers_to_transform` keeps only modules whose name carries one of those layer indices.

Everything here only reads the model, so a config that matches nothing (or something we
cannot adapt) fails before the model is touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from lorakit.errors import TargetModulesError
from lorakit.layer_shapes import conv1d_type
from lorakit.methods import inner_module
from lorakit.methods.adapter_layer import AdapterLayer
from lorakit.methods.modules_to_save import ModulesToSaveWrapper

SEQ_CLS_HEADS = ("score", "classifier")

def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit/Linear8bitLt subclass it) or GPT-2's Conv1D."""
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Embedding, AdapterLayer))


def named_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every named module, but never the insides of an adapted layer or a saved-module wrapper."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            if id(child) in seen:  # a module shared by two parents is listed once, as named_modules does
                continue
            seen.add(id(child))
            full = f"{prefix}.{name}" if prefix else name
            yield full, child
            if not isinstance(child, (AdapterLayer, ModulesToSaveWrapper)):
                yield from walk(child, full)

    return walk(model, "")


def matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's rule: a list matches a name equal to or ending with ".<item>"; a string is a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + key) for key in spec)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(match.group("idx")) if match else None


def _all_linear(model: nn.Module, config) -> list[str]:
    heads: set[int] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        heads.add(id(output))
    elif config.task_type == "SEQ_CLS":
        heads.update(id(getattr(model, h)) for h in SEQ_CLS_HEADS if getattr(model, h, None) is not None)
    return [
        name for name, module in named_candidates(model)
        if is_linear(inner_module(module)) and not isinstance(module, ModulesToSaveWrapper) and id(module) not in heads
    ]


def expand_all_linear(model: nn.Module, config) -> list[str] | None:
    """A target list that names "all-linear" beside other modules (Axolotl's `lora_target_linear` with
    `lora_target_modules`: the union) as the plain list PEFT reads: every linear layer's short name plus the
    others. None when the list has no "all-linear"."""
    spec = config.target_modules
    if not isinstance(spec, list | tuple) or "all-linear" not in spec:
        return None
    linear = dict.fromkeys(name.rsplit(".", 1)[-1] for name in _all_linear(model, config))
    return [*linear, *(s for s in spec if s != "all-linear" and s not in linear)]


def find_target_modules(model: nn.Module, config) -> list[str]:
    """Full names of the modules `config` adapts; raises TargetModulesError if none or unadaptable."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in config.default_targets:
            raise TargetModulesError(
                f"target_modules is not set and lorakit has no default for model type {model_type!r}. "
                f"Set target_modules, e.g. 'all-linear' or some of: {adaptable_summary(model)}."
            )
        spec = config.default_targets[model_type]
    candidates = dict(named_candidates(model))
    names = _all_linear(model, config) if spec == "all-linear" else [n for n in candidates if matches(spec, n)]
    if config.exclude_modules:
        names = [n for n in names if not matches(config.exclude_modules, n)]
    if config.modules_to_save:
        names = [n for n in names if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in config.modules_to_save)]
    if config.layers_to_transform is not None:
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        names = [n for n in names if _layer_index(n, config.layers_pattern) in wanted]
    if not names:
        raise TargetModulesError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + (" (after exclude_modules / layers_to_transform)" if spec != config.target_modules or config.exclude_modules
               or config.layers_to_transform is not None else "")
            + f". Adaptable modules: {adaptable_summary(model)}."
        )
    unsupported = [f"{n} ({type(candidates[n]).__name__})" for n in names if not is_adaptable(candidates[n])]
    if unsupported:
        raise TargetModulesError(
            f"target_modules matched modules lorakit cannot adapt: {', '.join(unsupported[:5])}. LoRA applies to "
            f"Linear, Conv1D and Embedding layers; adaptable modules here: {adaptable_summary(model)}."
        )
    return names


def find_modules_to_save(model: nn.Module, wanted: list[str]) -> list[str]:
    """Full names of modules named (or ending with ".name") in `modules_to_save`; each must exist."""
    found: list[str] = []
    for key in wanted:
        hits = [n for n, _ in named_candidates(model) if n == key or n.endswith("." + key)]
        hits = [h for h in hits if not any(h.startswith(f + ".") for f in hits)]  # outermost only
        if not hits:
            raise TargetModulesError(f"modules_to_save: no module named {key!r} in {type(model).__name__}.")
        found.extend(h for h in hits if h not in found)
    return found


def adaptable_summary(model: nn.Module, limit: int = 30) -> str:
    """Short names of adaptable modules, e.g. "q_proj, k_proj, …, embed_tokens" (the list users need)."""
    short = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in named_candidates(model) if is_adaptable(m))
    names = list(short)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"
