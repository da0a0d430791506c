"""Tool calls and structured output through `lorakit serve` (issue 34), with the official `openai` client and
langchain-openai against a real process on 127.0.0.1.

Two adapters: "toolsy" brings its own Hermes-style chat template that renders tools itself; "plain" uses the
base's ChatML template, which never mentions tools — tools then go in as a Hermes system message. Required
and named tool choices are enforced by the grammar, so every call parses and its arguments validate
(jsonschema), whatever the (random) weights say.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from chat_model import ADD, TOOL_TEMPLATE, WEATHER, build_chat_model, save_adapter
from lorakit.http.process import ServerProcess

TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("tools")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    save_adapter(base, tmp / "root" / "plain", 1)
    own = AutoTokenizer.from_pretrained(model_dir)
    own.chat_template = TOOL_TEMPLATE
    own.save_pretrained(save_adapter(base, tmp / "root" / "toolsy", 2))
    with ServerProcess("--model", str(model_dir), "--adapter-dir", str(tmp / "root"), "--max-model-len", "1024",
                       "--kv-cache-memory", "64") as process:
        yield process


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=120)


def _valid(call) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("model", ["toolsy", "plain"])
def test_required_and_named_tool_choices_always_give_calls_that_parse_and_validate(server, model):
    client = _client(server)
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "add"}}] * 2):
        reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=120, temperature=1.0, seed=seed)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls, message
        for call in message.tool_calls:
            _valid(call)
            assert call.id.startswith("call_") and call.type == "function"
            if isinstance(choice, dict):
                assert call.function.name == "add"


@pytest.mark.parametrize("model", ["toolsy", "plain"])
def test_streamed_tool_call_deltas_reassemble_to_the_whole_reply(server, model):
    client = _client(server)
    asked = dict(model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                 max_tokens=120, temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**asked).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_response_format_and_vllm_constraints(server):
    client = _client(server)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["city", "n"], "additionalProperties": False}
    for model in ("toolsy", "plain"):
        content = client.chat.completions.create(
            model=model, messages=ASK, max_tokens=60, temperature=0.7, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        ).choices[0].message.content
        jsonschema.validate(json.loads(content), schema)
        anything = client.chat.completions.create(model=model, messages=ASK, max_tokens=60, temperature=0.7, seed=2,
                                                  response_format={"type": "json_object"}).choices[0].message.content
        assert isinstance(json.loads(anything), dict)
    picked = client.completions.create(model="plain", prompt="Is it raining?", max_tokens=8, n=3, temperature=1, seed=3,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in picked.choices} <= {"yes", "no"}
    coded = client.completions.create(model="plain", prompt="Code:", max_tokens=10, temperature=1, seed=4,
                                      extra_body={"structured_outputs": {"regex": "[a-z]{3}[0-9]"}}).choices[0].text
    assert len(coded) == 4 and coded[:3].isalpha() and coded[3].isdigit()
    open_schema = {key: value for key, value in schema.items() if key != "additionalProperties"}
    for seed in range(3):  # vLLM's disable_additional_properties closes the object: only city and n, ever
        text = client.completions.create(model="plain", prompt="JSON:", max_tokens=60, temperature=1, seed=seed,
                                         extra_body={"structured_outputs": {"json": json.dumps(open_schema),
                                                                            "disable_additional_properties": True}})
        jsonschema.validate(json.loads(text.choices[0].text), schema)


def test_disable_additional_properties_closes_every_object_and_nothing_else():
    from lorakit.http.openai_protocol import _closed

    schema = {"type": "object", "properties": {"type": {"type": "object", "properties": {"x": {}}},
                                               "properties": {"type": "string"}},
              "$defs": {"Open": {"type": "object", "additionalProperties": True}},
              "anyOf": [{"properties": {"y": {}}}], "items": {"type": "array"}}
    closed = _closed(schema)
    assert closed["additionalProperties"] is False and closed["anyOf"][0]["additionalProperties"] is False
    assert closed["properties"]["type"]["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"type": "string"}  # a property named "properties" is a string
    assert closed["$defs"]["Open"]["additionalProperties"] is True and closed["items"] == {"type": "array"}


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": " *"}}, "structured_outputs"),
])
def test_bad_constraints_get_a_400_naming_the_field(server, body, param):
    reply = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"model": "plain", "messages": ASK, "max_tokens": 4, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_tool_results_go_back_into_the_prompt(server):
    """A conversation with an assistant call (arguments as OpenAI's JSON string) and the tool's result renders
    them for the model: as the adapter's template writes them, or in Hermes text for a plain template."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    for model in ("toolsy", "plain"):
        tokens = httpx.post(f"{server.url}/tokenize", json={"model": model, "messages": messages, "tools": TOOLS}).json()
        text = httpx.post(f"{server.url}/detokenize", json={"model": model, "tokens": tokens["tokens"]}).json()["prompt"]
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
        assert "<tool_response>\nsunny, 21C\n</tool_response>" in text and "get_weather" in text.split("<|im_start|>user")[0]
        reply = _client(server).chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=8)
        assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_langchain_structured_output_three_ways_and_a_tool_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        city: str = Field(max_length=6)
        n: int = Field(ge=0, le=9)

    chat = ChatOpenAI(model="toolsy", base_url=f"{server.url}/v1", api_key="-", temperature=0.7, max_tokens=80,
                      max_retries=0, seed=5)
    for method in ("function_calling", "json_schema"):
        result = chat.with_structured_output(Answer, method=method, include_raw=True).invoke("Where and how many?")
        assert result["parsing_error"] is None and isinstance(result["parsed"], Answer), (method, result["raw"])
    raw = chat.with_structured_output(Answer, method="json_mode", include_raw=True).invoke("Answer in JSON.")["raw"]
    assert isinstance(json.loads(raw.content), dict)  # json_mode: a JSON object (the schema is the prompt's job)

    class get_weather(BaseModel):  # noqa: N801 - a tool's name, as the model calls it
        """Weather in a city."""
        city: str = Field(max_length=8)  # bounded: the random model's strings end when the grammar says so

    with_tools = chat.bind_tools([get_weather], tool_choice="get_weather")
    first = with_tools.invoke([HumanMessage("Weather in Paris?")])
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather", first
    call = first.tool_calls[0]
    result = ToolMessage(f"sunny in {get_weather(**call['args']).city}", tool_call_id=call["id"])
    second = chat.bind_tools([get_weather]).invoke([HumanMessage("Weather in Paris?"), first, result])
    assert second.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("step", [1, 3, 50])
def test_a_stream_sends_the_content_before_a_call_and_holds_the_call(step):
    """Content before a Hermes call streams as it comes (up to where the call may begin, its whitespace held
    too); the call goes out at the end — the same content and call as the whole reply, at any chunking."""
    from lorakit.http.tool_replies import ToolStream, message_of

    text = 'Let me check <the> weather. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    stream, streamed = ToolStream("hermes"), []
    for i in range(0, len(text), step):
        streamed.append(stream.feed(text[i:i + step]))
    rest, calls = stream.finish()
    whole, called = message_of(text, "hermes")
    assert called and "".join(streamed) + rest == whole["content"] == "Let me check <the> weather."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    if step == 1:
        assert "".join(streamed[:3]) == "Let"  # content streams as it comes, not held to the end
