"""`lorakit serve` with a LoRA, a soft prompt and a prefix of different tenants in its adapter dir:
the official `openai` client, the requests sent together so they share packed steps, and every
greedy answer equal to that adapter's `generate` alone (which tests/methods/ check against PEFT's
forward — PEFT's own generate is wrong for virtual tokens on transformers 5.24). Then every layer
method beside LoRA on the same modules — IA3, AdaLoRA, bottleneck — from each way in: the adapter
dir, `--adapter` at start, the admin API and the registry (PEFT's generate is the oracle for IA3
and AdaLoRA; PEFT has no bottleneck adapters)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import peft
import pytest
import torch

import lorakit
from chat_model import GREEDY, QUESTION, build_chat_model, chat_ids, save_adapter
from lorakit.http.process import ServerProcess
from lorakit.registry import Registry
from lorakit.registry.store import folder_location


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("serve-methods")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    root = tmp / "root"
    save_adapter(base, root / "lora", 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([chat_ids(tokenizer)])

    def answer(model) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    answers = {None: answer(base), "lora": answer(lorakit.PeftModel.from_pretrained(copy.deepcopy(base), root / "lora"))}
    for name, config in {"soft": lorakit.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"),
                         "prefix": lorakit.PrefixTuningConfig(num_virtual_tokens=5)}.items():
        for seed in range(50):  # a random adapter whose greedy answer differs from the others' (the tiny model is
            torch.manual_seed(seed)  # nearly indifferent to most soft prompts)
            model = lorakit.get_peft_model(copy.deepcopy(base), config).eval()
            if answer(model) not in answers.values():
                break
        model.save_pretrained(root / name)
        answers[name] = answer(lorakit.PeftModel.from_pretrained(copy.deepcopy(base), root / name))
    layer_methods = {  # all on modules the LoRA (all-linear) wraps too
        "ia3": lambda: lorakit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"], init_ia3_weights=False),
        "adalora": lambda: lorakit.AdaLoraConfig(init_r=4, target_r=4, total_step=10,
                                                 target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "bottleneck": lambda: lorakit.BottleneckConfig(reduction_factor=4, init_weights=False),
    }
    extra = tmp / "extra"  # served from --adapter, the admin API and the registry (not the adapter dir)
    for name, config in layer_methods.items():
        for seed in range(50):
            torch.manual_seed(seed)
            model = lorakit.get_peft_model(copy.deepcopy(base), config()).eval()
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if "ia3_l" in pname or "lora_B" in pname or "lora_E" in pname or "adapter_up" in pname:
                        param.add_(torch.randn_like(param) * (1.0 if name != "ia3" else 0.8))
            if answer(model) not in answers.values():
                break
        model.save_pretrained(extra / name)
        folder = extra / name
        oracle = (lorakit if name == "bottleneck" else peft).PeftModel.from_pretrained(copy.deepcopy(base), folder)
        answers[name] = answer(oracle.eval())
    assert len(set(answers.values())) == len(answers), "the oracle answers must tell the adapters apart"
    return {"model": model_dir, "root": root, "extra": extra, "answers": answers}


def test_lora_soft_prompt_and_prefix_tenants_served_side_by_side(files):
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["root"]),
                       "--max-model-len", "256", "--kv-cache-memory", "64") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = ["lora", "soft", "prefix", str(files["model"])] * 3

        def ask(model: str) -> str:
            return client.chat.completions.create(model=model, messages=QUESTION, **GREEDY).choices[0].message.content

        with ThreadPoolExecutor(len(models)) as pool:
            replies = list(pool.map(ask, models))
        for model, reply in zip(models, replies, strict=True):
            expected = files["answers"][None if model == str(files["model"]) else model]
            assert reply == expected, model
        usage = client.chat.completions.create(model="soft", messages=QUESTION, **GREEDY).usage
        assert usage.prompt_tokens == len(chat_ids_of(files["model"]))  # the soft prompt is not billed as prompt


def test_every_layer_method_served_beside_lora_on_the_same_modules_from_every_way_in(files, tmp_path):
    """IA3 from --adapter-dir (copied in), bottleneck from --adapter at start, AdaLoRA through the admin API
    while LoRA requests run, IA3 again from the registry: each wraps its modules around the LoRA layers
    the server wrapped at start; every answer equals that adapter alone."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(files["root"] / "lora", root / "lora")
    shutil.copytree(files["extra"] / "ia3", root / "ia3")
    registry = Registry(*folder_location(tmp_path / "registry"))
    registry.push("ia3-reg", files["extra"] / "ia3", alias="prod")
    admin = "methods-admin"
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(root), "--adapter",
                       f"bn={files['extra'] / 'bottleneck'}", "--admin-key", admin, "--registry",
                       str(tmp_path / "registry"), "--max-model-len", "256", "--kv-cache-memory", "64") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def ask(model: str) -> str:
            return client.chat.completions.create(model=model, messages=QUESTION, **GREEDY).choices[0].message.content

        shutil.copytree(files["extra"] / "adalora", root / "adalora-files")
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(ask, "lora") for _ in range(6)]
            loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {admin}"},
                                json={"lora_name": "adalora", "lora_path": "adalora-files"}, timeout=60)
            assert loaded.status_code == 200, loaded.text
            assert all(f.result() == files["answers"]["lora"] for f in busy)
        models = ["lora", "ia3", "bn", "adalora", "ia3-reg", str(files["model"])] * 2
        with ThreadPoolExecutor(len(models)) as pool:
            replies = list(pool.map(ask, models))
        expected = {"bn": "bottleneck", "ia3-reg": "ia3", str(files["model"]): None}
        for model, reply in zip(models, replies, strict=True):
            assert reply == files["answers"][expected.get(model, model)], model


def chat_ids_of(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return chat_ids(AutoTokenizer.from_pretrained(model_dir))
