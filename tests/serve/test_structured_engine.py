"""Constrained decoding in the batched engine (issue 34): every constrained output parses and validates
against its schema (the `jsonschema` package) across 50 requests mixing 4 schemas, 3 adapters and the base
in one engine; the unconstrained requests in the same steps equal their greedy answers (no mask leaks into
a neighbour row); a grammar that does not compile is refused before admission."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch

import lorakit
from chat_model import build_chat_model
from lorakit.errors import RequestError
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.structured import StructuredOutput

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["color", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}, "required": ["name"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = build_chat_model(tmp_path_factory.mktemp("structured") / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = lorakit.PeftModel.for_serving(copy.deepcopy(base), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    for i in range(3):
        torch.manual_seed(10 + i)
        model.add_adapter(f"a{i}", lorakit.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                       init_lora_weights=False))
    return model, tokenizer


def _engine(setup) -> Engine:
    model, tokenizer = setup
    return Engine(copy.deepcopy(model), tokenizer, max_model_len=160, kv_cache_memory=1 << 24, block_size=8,
                  max_num_seqs=16)


def test_fifty_mixed_requests_validate_and_unconstrained_neighbours_are_untouched(setup):
    _, tokenizer = setup
    prompts = [tokenizer(f"record {i}: the answer is", add_special_tokens=False)["input_ids"] for i in range(50)]
    adapters = [("a0", "a1", "a2", None)[i % 4] for i in range(50)]
    constrained = [i % 2 == 0 for i in range(50)]
    plans = []
    for i in range(50):
        structured = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMAS[(i // 2) % 4])) if constrained[i] \
            else None
        plans.append(SamplingParams(max_tokens=96, structured=structured, temperature=0.8 if i % 3 else 0.0, seed=i))
    outputs = _engine(setup).generate(prompts, adapters, plans)
    for i, out in enumerate(outputs):
        if constrained[i]:
            assert out.finish_reason == "stop", (i, out.text)
            jsonschema.validate(json.loads(out.text), SCHEMAS[(i // 2) % 4])
    free = [i for i in range(50) if not constrained[i]]
    alone = _engine(setup).generate([prompts[i] for i in free], [adapters[i] for i in free], [plans[i] for i in free])
    assert [outputs[i].token_ids for i in free] == [o.token_ids for o in alone]  # no mask leaked into them


def test_choices_regex_and_each_n_choice_with_its_own_grammar_state(setup):
    _, tokenizer = setup
    engine = _engine(setup)
    ids = tokenizer("pick one:", add_special_tokens=False)["input_ids"]
    choice = SamplingParams(max_tokens=16, n=4, temperature=1.0, seed=3,
                            structured=StructuredOutput(kind="choice", spec=json.dumps(["yes", "no", "maybe"])))
    handle = engine.add_request(ids, "a1", choice)
    answers = [c.result().text for c in handle.choices]
    assert all(a in ("yes", "no", "maybe") for a in answers) and len(set(answers)) > 1
    regex = SamplingParams(max_tokens=24, structured=StructuredOutput(kind="regex", spec=r"[A-Z]{2}-\d{3}"))
    out = engine.generate([ids], [None], [regex])[0]
    assert out.finish_reason == "stop" and len(out.text) == 6 and out.text[2] == "-" and out.text[3:].isdigit()


@pytest.mark.parametrize(("structured", "says"), [
    (StructuredOutput(kind="json_schema", spec=json.dumps({"type": "nonsense"})), "nonsense"),
    (StructuredOutput(kind="regex", spec="(unclosed", param="guided_regex"), "unclosed"),
    (StructuredOutput(kind="grammar", spec="start: missing_rule", param="guided_grammar"), "missing_rule"),
])
def test_a_grammar_that_does_not_compile_is_refused_before_admission(setup, structured, says):
    engine = _engine(setup)
    with pytest.raises(RequestError, match=says) as refused:
        engine.add_request([5, 6, 7], None, SamplingParams(max_tokens=4, structured=structured))
    assert refused.value.param == structured.param and engine.waiting == 0
