"""`lorakit serve` with a LoRA, a soft prompt and a prefix of different tenants in its adapter dir:
the official `openai` client, the requests sent together so they share packed steps, and every
greedy answer equal to that adapter's `generate` alone (which tests/methods/ check against PEFT's
forward — PEFT's own generate is wrong for virtual tokens on transformers 5.24)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import lorakit
from chat_model import GREEDY, QUESTION, build_chat_model, chat_ids, save_adapter
from lorakit.serve.process import ServerProcess


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
    assert len(set(answers.values())) == len(answers), "the oracle answers must tell the adapters apart"
    return {"model": model_dir, "root": root, "answers": answers}


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


def chat_ids_of(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return chat_ids(AutoTokenizer.from_pretrained(model_dir))
