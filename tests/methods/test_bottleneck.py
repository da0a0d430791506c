"""Bottleneck adapters against a plain-PyTorch reference of the papers' equations (Houlsby et al. 2019:
after the attention output and after the MLP; Pfeiffer et al. 2020: after the MLP), fp32 atol 1e-5:
outputs and gradients; identity at init; our own file format round-trips; merge refused; stacking
applies adapters in sequence; rows beside LoRA and prompt-tuned rows in one batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import VOCAB, assert_rows_equal_alone, inputs_for, tiny_gpt2, tiny_llama
from lorakit.errors import MergeError

ATOL = 1e-5
ACT = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "swish": F.silu}


def reference(base, model, name: str, config: lorakit.BottleneckConfig):
    """The base with forward hooks computing h + W_up f(W_down h + b_down) + b_up on each adapted
    layer's output h, from the adapter's own tensors (read through PEFT-style names)."""
    ref = copy.deepcopy(base)
    params = dict(model.named_parameters())
    modules = dict(ref.named_modules())
    paths = sorted({n.removeprefix("base_model.model.").split(".adapter_down.")[0]
                    for n in params if ".adapter_down." in n})
    for path in paths:
        p = {k: params[f"base_model.model.{path}.{k}"] for k in (
            f"adapter_down.{name}.weight", f"adapter_down_bias.{name}", f"adapter_up.{name}.weight", f"adapter_up_bias.{name}")}

        def hook(module, args, h, p=p):
            z = F.linear(h, p[f"adapter_down.{name}.weight"], p[f"adapter_down_bias.{name}"])
            up = F.linear(ACT[config.non_linearity](z), p[f"adapter_up.{name}.weight"], p[f"adapter_up_bias.{name}"])
            return h + up if config.residual else up

        modules[path].register_forward_hook(hook)
    return ref, paths


@pytest.mark.parametrize("architecture,builder,expected", [
    ("houlsby", tiny_llama, {"self_attn.o_proj", "mlp.down_proj"}),
    ("pfeiffer", tiny_llama, {"mlp.down_proj"}),
    ("houlsby", tiny_gpt2, {"attn.c_proj", "mlp.c_proj"}),
])
@pytest.mark.parametrize("non_linearity,residual", [("relu", True), ("gelu", True), ("tanh", False)])
def test_outputs_and_gradients_equal_the_papers_equations(architecture, builder, expected, non_linearity, residual):
    base = builder()
    config = lorakit.BottleneckConfig(architecture=architecture, reduction_factor=4, non_linearity=non_linearity,
                                      residual=residual, init_weights=False)
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    ref, paths = reference(base, model, "default", config)
    assert {p.split(".", 3)[-1] for p in paths} == expected  # placed where the paper puts them
    inputs = inputs_for(base)
    torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, atol=ATOL, rtol=0)
    model(**inputs).logits.square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref(**inputs).logits.square().mean().backward()  # the hooks read the same parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ours[name], atol=ATOL, rtol=0, msg=name)


def test_identity_at_init_counts_and_files_round_trip(tmp_path):
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.BottleneckConfig(reduction_factor=4))
    inputs = inputs_for(base)
    torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=0, rtol=0)
    # 2 layers x (o_proj 32 + down_proj 32 wide): down (8, 32) + 8, up (32, 8) + 32 each
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (8 * 32 + 8 + 32 * 8 + 32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_()
    model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"peft_type": "BOTTLENECK"' in config and '"reduction_factor": 4' in config
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter_up.weight" in keys and len(keys) == 16


def test_merge_refused_and_stacking_runs_in_sequence():
    base = tiny_llama()
    config = lorakit.BottleneckConfig(architecture="pfeiffer", reduction_factor=4, init_weights=False)
    model = lorakit.get_peft_model(copy.deepcopy(base), config, "a")
    model.add_adapter("b", config)
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_and_unload()
    inputs = inputs_for(base)
    ref_a, _ = reference(base, model, "a", config)
    ref_ab, _ = reference(ref_a, model, "b", config)  # b's hook runs on a's output
    model.set_adapter(["a", "b"])
    torch.testing.assert_close(model(**inputs).logits, ref_ab(**inputs).logits, atol=ATOL, rtol=0)


def test_rows_beside_lora_and_prompt_rows_equal_each_alone():
    base = tiny_llama()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.BottleneckConfig(reduction_factor=4, init_weights=False),
                                   "bottleneck")
    model.add_adapter("lora", lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("ia3", lorakit.IA3Config(target_modules=["k_proj"], init_ia3_weights=False))
    assert_rows_equal_alone(model.eval(), base, inputs_for(base, batch=4), ["bottleneck", "lora", "__base__", "ia3"])
    model.add_adapter("prompt", lorakit.PromptTuningConfig(num_virtual_tokens=3))
    ids = torch.randint(1, VOCAB, (3, 5))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["prompt", "bottleneck", "lora"]).logits
        for row, name in enumerate(["prompt", "bottleneck", "lora"]):
            model.set_adapter(name)
            torch.testing.assert_close(mixed[row, -5:], model(input_ids=ids[row:row + 1]).logits[0, -5:],
                                       atol=ATOL, rtol=0, msg=name)
