"""Fuzz: 200+ corrupted variants of a real adapter directory. Every one must raise an
AdapterError subclass (nothing else, no crash), and the model it was loaded into must be
exactly as before — same modules, same adapters, same tensors.

Variants: truncations of both files; single-bit and whole-byte flips anywhere in the
weights file and single-bit flips in the config (lorakit files carry a checksum and a
config digest, so none of these can load silently); semantic edits of the JSON; tensors
swapped, reshaped, dropped, added, retyped or poisoned with NaN/Inf — both keeping our
integrity metadata (caught as tampering) and stripped of it as another tool would write
them (caught by the shape, key and value checks).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from conftest import tiny_llama
from lorakit.errors import AdapterError
from lorakit.files.format import CONFIG_NAME, WEIGHTS_NAME

RNG_SEED = 1234


def _source(tmp: Path) -> Path:
    torch.manual_seed(RNG_SEED)  # the same bytes whatever ran before: a failing variant reproduces by its label
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], init_lora_weights=False))
    model.save_pretrained(tmp / "source")
    return tmp / "source"


def _tensors_and_metadata(directory: Path):
    with safe_open(directory / WEIGHTS_NAME, "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def _variants(source: Path):
    """Yield (label, function that corrupts a copy of the adapter directory)."""
    rng = random.Random(RNG_SEED)
    weights_size = (source / WEIGHTS_NAME).stat().st_size
    config_size = (source / CONFIG_NAME).stat().st_size

    def cut(name, size):
        return lambda d: (d / name).write_bytes((d / name).read_bytes()[:size])

    def flip(name, offset, mask):
        def apply(d):
            data = bytearray((d / name).read_bytes())
            data[offset] ^= mask
            (d / name).write_bytes(bytes(data))
        return apply

    for i in range(40):
        yield f"truncate weights {i}", cut(WEIGHTS_NAME, rng.randrange(0, weights_size))
    for i in range(15):
        yield f"truncate config {i}", cut(CONFIG_NAME, rng.randrange(0, config_size))
    for i in range(60):
        yield f"bit flip weights {i}", flip(WEIGHTS_NAME, rng.randrange(weights_size), 1 << rng.randrange(8))
    for i in range(20):
        yield f"byte flip weights {i}", flip(WEIGHTS_NAME, rng.randrange(weights_size), 0xFF)
    for i in range(30):
        yield f"bit flip config {i}", flip(CONFIG_NAME, rng.randrange(config_size), 1 << rng.randrange(8))

    def edit_json(change):
        def apply(d):
            config = json.loads((d / CONFIG_NAME).read_text())
            change(config)
            (d / CONFIG_NAME).write_text(json.dumps(config))
        return apply

    edits = {
        "r": lambda c: c.update(r=8), "alpha": lambda c: c.update(lora_alpha=9), "rslora": lambda c: c.update(use_rslora=True),
        "drop r": lambda c: c.pop("r"), "r as text": lambda c: c.update(r="four"), "r zero": lambda c: c.update(r=0),
        "targets": lambda c: c.update(target_modules=["k_proj"]), "targets none": lambda c: c.update(target_modules=["nothing"]),
        "targets regex": lambda c: c.update(target_modules="[unclosed"), "peft type": lambda c: c.update(peft_type="IA3"),
        "unknown key": lambda c: c.update(lora_alhpa=3), "rank pattern": lambda c: c.update(rank_pattern={"q_proj": 2}),
        "alpha pattern": lambda c: c.update(alpha_pattern={"v_proj": 1}), "bias": lambda c: c.update(bias="all"),
        "dropout": lambda c: c.update(lora_dropout=0.5), "fan": lambda c: c.update(fan_in_fan_out=True),
        "modules_to_save": lambda c: c.update(modules_to_save=["lm_head"]), "layers": lambda c: c.update(layers_to_transform=[0]),
        "dora": lambda c: c.update(use_dora=True), "replication": lambda c: c.update(layer_replication=[[0, 1]]),
    }
    for label, change in edits.items():
        yield f"edit json {label}", edit_json(change)
    for label, text in {"empty": "", "list": "[]", "null": "null", "string": '"LORA"', "binary": "\x00\x01"}.items():
        yield f"replace json {label}", lambda d, text=text: (d / CONFIG_NAME).write_text(text)

    def edit_tensors(change, keep_metadata: bool):
        def apply(d):
            tensors, metadata = _tensors_and_metadata(d)
            change(tensors)
            save_file(tensors, d / WEIGHTS_NAME, metadata=metadata if keep_metadata else {"format": "pt"})
        return apply

    tensors, _ = _tensors_and_metadata(source)
    keys = sorted(tensors)
    a_keys = [k for k in keys if k.endswith("lora_A.weight")]

    def swap(k1, k2):
        return lambda t: t.update({k1: t[k2], k2: t[k1]})

    tensor_edits = {
        "swap A layers": swap(a_keys[0], a_keys[2]),  # same shape: only the checksum can tell
        "swap A and B": swap(a_keys[0], a_keys[0].replace("lora_A", "lora_B")),
        "reshape A": lambda t: t.update({a_keys[1]: t[a_keys[1]].reshape(t[a_keys[1]].shape[::-1]).contiguous()}),
        "flatten A": lambda t: t.update({a_keys[1]: t[a_keys[1]].flatten()}),
        "drop B": lambda t: t.pop(a_keys[2].replace("lora_A", "lora_B")),
        "drop embedding A": lambda t: t.pop(next(k for k in keys if k.endswith("lora_embedding_A"))),
        "extra module": lambda t: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": t[a_keys[0]].clone()}),
        "extra unprefixed": lambda t: t.update({"q_proj.lora_A.weight": t[a_keys[0]].clone()}),
        "nan": lambda t: t[a_keys[0]].__setitem__((0, 0), float("nan")),
        "inf": lambda t: t[a_keys[1]].__setitem__((1, 1), float("inf")),
        "int": lambda t: t.update({a_keys[0]: t[a_keys[0]].to(torch.int32)}),
        "rank 2": lambda t: t.update({k: (t[k][:2] if "lora_A" in k else t[k][:, :2]).contiguous() for k in keys
                                      if "layers.0.self_attn.q_proj" in k}),
        "bigger in": lambda t: t.update({a_keys[0]: torch.zeros(4, 40)}),
    }
    for label, change in tensor_edits.items():
        yield f"tamper {label}", edit_tensors(change, keep_metadata=True)
        yield f"foreign {label}", edit_tensors(change, keep_metadata=False)
    yield "foreign swap + nan", edit_tensors(lambda t: (swap(a_keys[0], a_keys[1])(t), t[a_keys[0]].fill_(float("nan"))), False)
    yield "drop weights", lambda d: (d / WEIGHTS_NAME).unlink()
    yield "drop config", lambda d: (d / CONFIG_NAME).unlink()
    yield "pickle only", lambda d: (torch.save({}, d / "adapter_model.bin"), (d / WEIGHTS_NAME).unlink())
    yield "weights is a dir", lambda d: ((d / WEIGHTS_NAME).unlink(), (d / WEIGHTS_NAME).mkdir())


def _snapshot(model):
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        dict(model.peft_config),
        model.active_adapters,
    )


def test_every_corrupted_adapter_is_refused_and_the_model_is_unchanged(tmp_path):
    source = _source(tmp_path)
    variants = list(_variants(source))
    assert len(variants) >= 200
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    before = _snapshot(model)
    loaded_silently, wrong_error = [], []
    for index, (label, corrupt) in enumerate(variants):
        target = tmp_path / f"v{index}"
        shutil.copytree(source, target)
        corrupt(target)
        try:
            if index % 3 == 0:  # both entry points: onto a bare base, and next to an existing adapter
                lorakit.PeftModel.from_pretrained(tiny_llama(), target)
            else:
                model.load_adapter(target, "candidate")
            loaded_silently.append(label)
            if "candidate" in model.peft_config:  # keep going: every silent load gets reported, not just the first
                model.delete_adapter("candidate")
        except AdapterError:
            pass
        except Exception as error:  # noqa: BLE001 - reported with the variant that caused it
            wrong_error.append(f"{label}: {type(error).__name__}: {error}")
        shutil.rmtree(target)
    seed = f"(RNG_SEED={RNG_SEED}; rerun the variant by its label)"
    assert not loaded_silently, f"corruptions that loaded without an error {seed}: {loaded_silently}"
    assert not wrong_error, f"corruptions refused with something other than an AdapterError {seed}: {wrong_error}"
    names, state, configs, active = _snapshot(model)
    assert names == before[0] and configs.keys() == before[2].keys() and active == before[3]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


@pytest.mark.parametrize("verify", [True, False])
def test_the_source_itself_loads(tmp_path, verify):
    """The uncorrupted directory loads (so the refusals above are about the corruption)."""
    lorakit.PeftModel.from_pretrained(tiny_llama(), _source(tmp_path), verify_integrity=verify)
