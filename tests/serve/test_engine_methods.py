"""Every method served side by side by the continuous-batching engine: requests with soft prompts
(prompt tuning, P-tuning), prefixes (plain, projected), LoRA, IA3, AdaLoRA, bottleneck adapters and
the base share packed steps; each request's greedy tokens equal that adapter run alone through
`model.generate` (which tests/methods/ check against PEFT's forward), fp32, token for token —
with chunked prefill splitting the virtual slots and with adapters loaded from files."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import VOCAB, tiny_llama
from lorakit.serve import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
CONFIGS = {
    "lora": lambda: lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: lorakit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                     init_ia3_weights=False),
    "prompt": lambda: lorakit.PromptTuningConfig(num_virtual_tokens=5),
    "p_tuning": lambda: lorakit.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix": lambda: lorakit.PrefixTuningConfig(num_virtual_tokens=4),
    "prefix_projection": lambda: lorakit.PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=True),
    "bottleneck": lambda: lorakit.BottleneckConfig(reduction_factor=4, init_weights=False, target_modules=["o_proj"]),
    "adalora": lambda: lorakit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["up_proj"],
                                             init_lora_weights=False),
}
LAYER_METHODS = ("lora", "ia3", "bottleneck", "adalora")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each method's adapter saved alone (random, so it changes outputs), and the base."""
    base, root = tiny_llama(), tmp_path_factory.mktemp("methods")
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        one = lorakit.get_peft_model(copy.deepcopy(base), make(), adapter_name=name)
        with torch.no_grad():
            for pname, param in one.named_parameters():
                if "ia3_l" in pname or "adapter_up" in pname:
                    param.add_(torch.randn_like(param) * 0.5)
        one.save_pretrained(root / name, selected_adapters=[name])
    return base, {name: root / name / name for name in CONFIGS}


def alone(base, path, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if path is None:
            return base.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(prompt):].tolist()
        oracle = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        out = oracle.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("batched_tokens", [512, 4])  # 4: prefill chunks split the virtual slots
def test_every_method_in_one_engine_equals_each_alone(saved, batched_tokens):
    base, paths = saved
    # A serving model: each layer method's modules wrapped up front (one module, one method), so every load
    # below is a tensor write between steps; virtual-token adapters wrap nothing.
    model = lorakit.PeftModel.for_serving(copy.deepcopy(base), CONFIGS["lora"]())
    for name in LAYER_METHODS[1:]:
        model.reserve_targets(CONFIGS[name]())
    engine = Engine(model, max_model_len=64, max_num_batched_tokens=batched_tokens, kv_cache_memory=1 << 22,
                    block_size=4)
    for name, path in paths.items():
        engine.adapters.register(name, path)
    names = [*CONFIGS, None, "prompt", "prefix"]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 9, (len(names),), generator=gen)]
    outputs = engine.generate(prompts, adapters=names, sampling=GREEDY)
    for name, prompt, output in zip(names, prompts, outputs, strict=True):
        assert output.error is None, output.error
        assert output.token_ids == alone(base, paths.get(name), prompt), name
