"""Fine-tune a tool caller, then serve it (issue 34): a chat record with `tools` and assistant `tool_calls`
(OpenAI's fine-tuning format) trains with the loss on the call tokens — rendered as `lorakit serve` renders
them, through a template that writes tools itself or, for one that does not, as a Hermes system message —
and the adapter, served with those tools, makes the call it learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chat_model import ADD, TOOL_TEMPLATE, WEATHER, build_chat_model, write_jsonl
from lorakit.tool_calls import HERMES_SYSTEM, parse, template_format
from lorakit.train.data import IGNORE_INDEX, encode_record

TOOLS = [WEATHER, ADD]
CALLS = {"What is the weather in Paris?": ("get_weather", {"city": "Paris"}),
         "Add 2 and 3.": ("add", {"a": 2, "b": 3})}


def _record(question: str, name: str, arguments: dict, answer: str | None = None) -> dict:
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if answer is not None:
        messages += [{"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": TOOLS}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    # a wider model whose tokenizer has learned the tools' words: a call is a few dozen tokens it can learn
    listing = [json.dumps(t) for t in TOOLS] + [json.dumps(_record(q, *c)) for q, c in CALLS.items()]
    model_dir = build_chat_model(tmp_path_factory.mktemp("tool-train") / "base", hidden=128, positions=1024, vocab=1200, init_range=0.1,
                                 corpus=tuple(listing * 4 + [HERMES_SYSTEM]))
    plain = AutoTokenizer.from_pretrained(model_dir)
    own = AutoTokenizer.from_pretrained(model_dir)
    own.chat_template = TOOL_TEMPLATE
    return model_dir, {"hermes": own, "system": plain}


@pytest.mark.parametrize("fmt", ["hermes", "system"])
def test_the_loss_covers_the_call_and_the_answer_not_the_tools_or_the_result(tokenizers, fmt):
    _, by_format = tokenizers
    tokenizer = by_format[fmt]
    assert template_format(tokenizer.chat_template) == fmt
    example = encode_record(tokenizer, _record("What is the weather in Paris?", "get_weather", {"city": "Paris"},
                                               "It is sunny."), "messages")
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                if label != IGNORE_INDEX])
    given = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                              if label == IGNORE_INDEX])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in learned
    assert "It is sunny." in learned and "sunny\n</tool_response>" not in learned
    assert '"name": "get_weather"' in given.split("What is the weather")[0]  # the tools: prompt, no loss
    assert "<tool_response>\nsunny\n</tool_response>" in given


def test_an_adapter_trained_on_calls_makes_them_when_served_with_the_tools(tokenizers, tmp_path):
    import copy

    from transformers import LlamaForCausalLM

    import lorakit
    from lorakit.http.openai_protocol import ChatMessage
    from lorakit.http.prompts import render_chat
    from lorakit.serve import Engine, SamplingParams
    from lorakit.train.config import load_job_config
    from lorakit.train.job import run_train

    model_dir, by_format = tokenizers
    tokenizer = by_format["hermes"]
    tokenizer.save_pretrained(model_dir)  # the model's own template renders tools
    data = write_jsonl(tmp_path / "calls.jsonl", [_record(q, *call) for q, call in CALLS.items()] * 4)
    config = {"model": str(model_dir), "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                                "target_modules": "all-linear"},
              "data": {"train": str(data), "eval": str(data), "format": "messages", "max_seq_len": 320},
              "train": {"max_steps": 60, "batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                        "warmup_ratio": 0.0, "seed": 1, "logging_steps": 20, "save_steps": 1000, "eval_steps": 1000},
              "eval": {"max_new_tokens": 4, "samples": 0}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    run_train(load_job_config(path))
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    serving = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    engine = Engine(serving, tokenizer, max_model_len=320)
    engine.adapters.load("caller", Path(tmp_path / "run" / "adapter")).result()
    for question, (name, arguments) in CALLS.items():
        ids = render_chat(tokenizer, [ChatMessage(role="user", content=question)], tools=TOOLS)
        text = engine.generate([ids], ["caller"], SamplingParams(max_tokens=40))[0].text
        content, calls = parse(text, template_format(tokenizer.chat_template))
        assert [(c.name, c.arguments) for c in calls] == [(name, arguments)], text
    engine.close()
