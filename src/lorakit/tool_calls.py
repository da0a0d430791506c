"""Tool calls in the formats chat templates use: how tools reach the prompt, how a model's calls read back as
OpenAI's `tool_calls`, and the grammar that makes a call well-formed when a request requires one.

Two formats cover the templates our users train and serve (SmolLM2/SmolLM3, Qwen2.5/3, Hermes, Llama 3.x):

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen, Hermes,
  SmolLM3; SmolLM2 writes a JSON list inside one block — read too);
- `llama3`: a bare JSON object `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` for some), calls
  separated by `;`.

A template that renders `tools` itself is given them (`tools=` to apply_chat_template) and its format is
read off its text; a template that never mentions tools (SmolLM2-135M's, a plain ChatML one) gets them
as a system message in the Hermes wording, as Qwen's template writes it, and answers in that format — so
a tool-call adapter trained with lorakit on such a template is served with the same prompt it trained on
(train/data.py renders training records through `template_messages` the same way).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# JSON as json.dumps writes it: one line, ", " and ": " — no run of whitespace for an unsure model to loop in
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}
        return call if index is None else {"index": index, **call}


def template_format(chat_template: str | None) -> str:
    """The call format a template writes: "llama3", "hermes", or "system" (it never mentions tools: they go in
    a Hermes system message, and calls come back in Hermes' format)."""
    text = chat_template or ""
    if "tools" not in text:
        return "system"
    if "<|python_tag|>" in text or '"parameters"' in text and "<tool_call>" not in text:
        return "llama3"
    return "hermes"


def chat_text(tokenizer, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None,
              **options) -> str:
    """A chat as text through its template, tools and past calls rendered the one way both training
    (train/data.py) and serving (http/prompts.py) use; `options` (add_generation_prompt, …) win over ours."""
    fmt = template_format(chat_template or getattr(tokenizer, "chat_template", None))
    if tools and fmt != "system":
        options.setdefault("tools", tools)
    if chat_template:
        options.setdefault("chat_template", chat_template)
    return tokenizer.apply_chat_template(template_messages(messages, tools, fmt), tokenize=False, **options)


def template_messages(messages: list[dict], tools: list[dict] | None, fmt: str) -> list[dict]:
    """OpenAI's messages as chat templates read them: an assistant's tool calls with their arguments as objects
    (OpenAI sends a JSON string; templates `tojson` them), and — for a template that renders no tools — the
    tools as a Hermes system message (merged into the first system message) and past calls as Hermes text."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = [_template_call(c) for c in message["tool_calls"]]
            if fmt == "system":
                text = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n</tool_call>"
                                 for c in calls)
                message = {k: v for k, v in message.items() if k != "tool_calls"}
                message["content"] = ((message.get("content") or "") + ("\n" if message.get("content") else "") + text)
            else:
                message["tool_calls"] = calls
        if fmt == "system" and message.get("role") == "tool":  # as Qwen's template writes a tool result
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        out.append(message)
    if tools and fmt == "system":
        listing = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{listing}".strip()}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _template_call(call: dict) -> dict:
    function = dict(call.get("function", call))
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # left as sent: the template shows it as text
    return {**{k: v for k, v in call.items() if k != "function"}, "type": "function", "function": function}


def parse(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(the text outside calls, the calls) of a model's answer; no calls if none parses."""
    if fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = [c for part in body.split(";") if (c := _call(_json(part.strip()))) is not None]
        return ("", calls) if calls and len(calls) == len([p for p in body.split(";") if p.strip()]) else (text, [])
    calls = []
    for block in _HERMES_CALL.findall(text):
        found = _json(block)
        for item in found if isinstance(found, list) else [found]:
            call = _call(item)
            if call is not None:
                calls.append(call)
    if not calls:
        return text, []
    return _HERMES_CALL.sub("", text).strip(), calls


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments)
    return ToolCall(item["name"], arguments) if isinstance(arguments, dict) else None


def opening(fmt: str) -> str:
    """What a call's text starts with in this format (a stream holds text back while it may be one)."""
    return "{" if fmt == "llama3" else "<tool_call>"


def call_grammar(tools: list[dict], names: list[str], fmt: str, parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) whose sentences are calls of `names` with arguments valid for
    their parameters: what `tool_choice` "required" or a named function enforces."""
    key = "parameters" if fmt == "llama3" else "arguments"
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if function.get("name") in names:
            parameters = dict(function.get("parameters") or {"type": "object"})
            parameters.setdefault("additionalProperties", False)  # as OpenAI's strict mode: only the declared ones
            options.append({"type": "object", "properties": {"name": {"const": function["name"]}, key: parameters},
                            "required": ["name", key], "additionalProperties": False})
    schema = json.dumps({"x-guidance": JSON_LAYOUT, **(options[0] if len(options) == 1 else {"anyOf": options})})
    if fmt == "llama3":
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: %json {schema}"
    repeat = ' ("\\n" call)*' if parallel else ""
    return f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {schema}'
