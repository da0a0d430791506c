"""Training data: files → records → token ids and labels, with the loss on the answer only.

Five formats, decided from the columns (or `data.format`):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}  chat (OpenAI's
                                                    fine-tuning JSONL: an assistant turn with "weight": 0 gets no loss;
                                                    "tools": [...] and assistant "tool_calls" train a tool caller)
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}    ShareGPT (system: optional)
    {"instruction": ..., "input": ..., "output": ..., "system": ...}              Alpaca (input, system optional)
    {"prompt": ..., "completion": ...}                                             TRL's convention
    {"text": ...}                                                                  plain text

ShareGPT becomes the chat it spells (human → user, gpt → assistant); an Alpaca record is the
chat [system, user: instruction + "\n" + input, assistant: output], as LLaMA-Factory reads
it, rendered by the tokenizer's own template (no Alpaca prompt prose is added).

A chat is rendered with the tokenizer's chat template; the loss covers the assistant turns
only (each turn's span is the difference between the chat rendered up to the turn's
generation prompt and rendered through the turn). A prompt/completion pair is the chat
[user: prompt, assistant: completion] when the tokenizer has a template (instruct models
expect it), else the plain concatenation prompt + completion + EOS (TRL's rule). Positions
without loss get label -100, which torch's cross-entropy skips. `train_on_prompt` puts the
loss on every token.

Examples longer than `max_seq_len` are cut; the cut is counted, and an example left with
no loss tokens is dropped (also counted).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import DataError
from lorakit.tool_calls import chat_text
from lorakit.train.alpaca_prompts import alpaca_ids
from lorakit.train.splits import apply_split

IGNORE_INDEX = -100  # what torch's cross-entropy skips
# In the order `auto` tries them: an Alpaca file often carries a pre-rendered "text" column too.
FORMAT_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                  "prompt_completion": ("prompt", "completion"), "text": ("text",)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None  # what generation starts from (None for plain text)
    reference: str | None = None  # the expected answer, for exact/contains match
    question: str | None = None  # the prompt as a person wrote it, for the report
    truncated: bool = False
    group: str | None = None  # a record's optional "group" column: the before/after table is also shown per group
    # (an optional "answer" column replaces `reference`: the key answer a longer completion states)


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # cut so short that no loss token was left
    tokens: int = 0
    loss_tokens: int = 0
    longest: int = 0

    def add(self, example: Example) -> None:
        self.examples += 1
        self.truncated += example.truncated
        self.tokens += len(example.input_ids)
        self.loss_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        self.longest = max(self.longest, len(example.input_ids))


@dataclass
class Dataset:
    """Encoded examples (a list is all HF Trainer needs: __len__ and __getitem__)."""

    examples: list[Example]
    stats: DataStats = field(default_factory=DataStats)
    format: str = "text"
    rows: list[dict[str, list[int]]] | None = None  # packed rows, when packing

    def __len__(self) -> int:
        return len(self.rows if self.rows is not None else self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if self.rows is not None:
            return self.rows[index]
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


# -- reading files ---------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Records from JSONL (one object per line), JSON (a list of objects) or CSV (a header row)."""
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} not found.")
    try:
        records = _read_csv(path) if path.suffix.lower() == ".csv" else _read_json(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8.") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {number}: expected a JSON object, got {type(record).__name__}.")
    if not records:
        raise DataError(f"{path}: the data set is empty (no records).")
    return records


def _read_csv(path: Path) -> list[dict]:
    # As the csv module requires: newline="" keeps newlines inside quoted cells; utf-8-sig drops a
    # byte-order mark (Excel writes one), which would otherwise be part of the first column's name.
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}).") from None


def _read_json(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}.") from None
    records = []  # .jsonl, .json holding JSON lines, anything else
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}): {line[:80]!r}") from None
    return records


def detect_format(records: list[dict], path: Path, requested: str = "auto") -> str:
    """The format named in the config, or the one the first record's columns fit; every record is checked."""
    if requested == "auto":
        columns = set(records[0])
        fitting = [name for name, needed in FORMAT_COLUMNS.items() if set(needed) <= columns]
        if not fitting:
            raise DataError(
                f"{path}: the columns {sorted(columns)} fit no data format. Expected 'messages' (chat), "
                "'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca), 'prompt' + 'completion', or 'text'."
            )
        requested = fitting[0]
    needed = FORMAT_COLUMNS[requested]
    for number, record in enumerate(records, start=1):
        missing = [c for c in needed if record.get(c) in (None, "")]
        if missing:
            raise DataError(
                f"{path}, record {number}: format {requested!r} needs {list(needed)}; missing {missing} "
                f"(columns found: {sorted(record)})."
            )
    return requested


# -- encoding -----------------------------------------------------------------------------------
def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
             tools: list[dict] | None = None) -> list[int]:
    """A chat's token ids, tools and tool calls rendered as `lorakit serve` renders them (tool_calls.py), so an
    adapter trained on calls is served the prompt it trained on."""
    text = chat_text(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_content(message: dict, number: int) -> dict:
    """The message as the chat template wants it: ShareGPT spellings read as OpenAI's (`from`/`value`,
    roles human/gpt), LLaMA-Factory v1's `loss_weight` as OpenAI's `weight`, and list-of-parts content
    (OpenAI's [{"type": "text", "text": ...}], LLaMA-Factory v1's {"type": "text", "value": ...}) as one
    string — templates written for string content (most, SmolLM2's included) cannot concatenate a list."""
    if "role" not in message and "from" in message:
        message = {**{k: v for k, v in message.items() if k not in ("from", "value")}, "role": message["from"],
                   "content": message.get("value")}
    if message.get("role") in ("human", "gpt"):
        message = {**message, "role": SHAREGPT_ROLES[message["role"]]}
    if "loss_weight" in message and "weight" not in message:
        message = {**{k: v for k, v in message.items() if k != "loss_weight"}, "weight": message["loss_weight"]}
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content}
    if kinds - {"text"}:
        raise DataError(f"message {number} has content parts of type {sorted(map(str, kinds - {'text'}))}; only "
                        "text parts can be trained on (render other parts to text, or drop the record).")
    texts = [part["text"] if "text" in part else part.get("value") for part in content]
    if any(not isinstance(text, str) for text in texts):
        raise DataError(f"message {number} has a text part without a string 'text' (or 'value'): {content!r:.120}")
    return {**message, "content": "".join(texts)}


def rendered_chat(tokenizer, messages, tools: list[dict] | None = None) -> tuple[list[dict], list[int]]:
    """(messages, token ids) of a chat the template renders, or a DataError naming the message it
    cannot render and why (instead of a template traceback)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and ("role" in m or "from" in m) for m in messages):
        raise DataError(f"'messages' must be a list of objects with a 'role'; got {messages!r:.120}")
    messages = [text_content(m, n) for n, m in enumerate(messages, start=1)]
    try:
        return messages, chat_ids(tokenizer, messages, tools=tools)
    except Exception as exc:  # noqa: BLE001 (jinja2 and template code raise anything): find the message
        failed = next((n for n in range(1, len(messages) + 1) if not _renders(tokenizer, messages[:n], tools)),
                      len(messages))
        message = messages[failed - 1]
        what = ", ".join([f"role {message['role']!r}"] + (["content null"] if message.get("content") is None else [])
                         + (["tool_calls"] if message.get("tool_calls") else []))
        raise DataError(f"the chat template could not render message {failed} ({what}): "
                        f"{type(exc).__name__}: {exc}. Give every message text content, or use a model whose "
                        "template renders tool calls.") from None


def _renders(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> bool:
    try:
        chat_ids(tokenizer, messages, tools=tools)
        return True
    except Exception:  # noqa: BLE001
        return False


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False,
                tools: list[dict] | None = None) -> Example:
    """Token ids of a rendered chat; labels on the assistant turns — their text and their tool calls (OpenAI's
    `tool_calls`, with the record's `tools` in the prompt) — or on everything."""
    messages, ids = rendered_chat(tokenizer, messages, tools)
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    last_prompt: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("weight", 1):  # OpenAI's weight 0: context only
            continue
        head = chat_ids(tokenizer, messages[:turn], add_generation_prompt=True, tools=tools)
        end = len(chat_ids(tokenizer, messages[: turn + 1], tools=tools))
        if ids[: len(head)] != head:
            raise DataError("the chat template renders a conversation's prefix differently from the whole "
                            "conversation, so assistant turns cannot be located; use train_on_prompt: true.")
        labels[len(head):end] = ids[len(head):end]
        last_prompt = head
    reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    asked = [m["content"] for m in messages[:-1] if m["role"] != "assistant"]
    return Example(ids, labels, last_prompt or None, reference, asked[-1] if asked else None)


def encode_prompt_completion(tokenizer, prompt, completion, train_on_prompt: bool = False,
                             chat_template: bool = True) -> Example:
    """TRL's prompt/completion: as a chat when the tokenizer has a template, else concatenated text."""
    if isinstance(prompt, list):  # TRL's conversational prompt/completion
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return encode_chat(tokenizer, prompt + completion, train_on_prompt)
    if chat_template and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                           train_on_prompt)
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    labels = (head if train_on_prompt else [IGNORE_INDEX] * len(head)) + answer
    return Example(head + answer, labels, head, completion, prompt)


def encode_text(tokenizer, text: str) -> Example:
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=True)["input_ids"]
    return Example(ids, list(ids))


def sharegpt_messages(record: dict) -> list[dict]:
    """ShareGPT's turns as chat messages (a top-level "system" first, as LLaMA-Factory allows)."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        raise DataError(f"'conversations' must be a list of {{\"from\": ..., \"value\": ...}}; got {turns!r:.120}")
    unknown = sorted({str(t["from"]) for t in turns} - set(SHAREGPT_ROLES))
    if unknown:
        raise DataError(f"ShareGPT turns from {unknown} cannot be trained on as chat (known: human, gpt, system); "
                        "render tool turns as text, or drop the record.")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def encode_alpaca(tokenizer, record: dict, train_on_prompt: bool = False, chat_template: bool = True,
                  prompt_style: str = "template") -> Example:
    """instruction (+ "\n" + input) → output, with the optional system prompt first; or, with an Axolotl
    `prompt_style`, Axolotl's Alpaca prose prompt (alpaca_prompts.py)."""
    if record.get("history"):
        raise DataError("Alpaca 'history' (earlier turns) is not read; write the record as ShareGPT or messages.")
    if prompt_style != "template":
        head, response = alpaca_ids(tokenizer, prompt_style, record["instruction"], record.get("input"),
                                    record["output"])
        labels = (list(head) if train_on_prompt else [IGNORE_INDEX] * len(head)) + response
        return Example(head + response, labels, head, record["output"], record["instruction"])
    prompt = "\n".join(part for part in (record["instruction"], record.get("input")) if part)
    system = record.get("system")
    if system and chat_template and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": prompt},
                                       {"role": "assistant", "content": record["output"]}], train_on_prompt)
    example = encode_prompt_completion(tokenizer, f"{system}\n\n{prompt}" if system else prompt, record["output"],
                                       train_on_prompt, chat_template)
    return dataclasses.replace(example, question=prompt)


def encode_record(tokenizer, record: dict, fmt: str, train_on_prompt: bool = False, chat_template: bool = True,
                  prompt_style: str = "template") -> Example:
    if fmt == "messages":
        return encode_chat(tokenizer, record["messages"], train_on_prompt, tools=record.get("tools"))
    if fmt == "sharegpt":
        return encode_chat(tokenizer, sharegpt_messages(record), train_on_prompt)
    if fmt == "alpaca":
        return encode_alpaca(tokenizer, record, train_on_prompt, chat_template, prompt_style)
    if fmt == "prompt_completion":
        return encode_prompt_completion(tokenizer, record["prompt"], record["completion"], train_on_prompt, chat_template)
    return encode_text(tokenizer, record["text"])


def truncate(example: Example, max_len: int) -> Example:
    if len(example.input_ids) <= max_len:
        return example
    return dataclasses.replace(example, input_ids=example.input_ids[:max_len], labels=example.labels[:max_len],
                               truncated=True)


def load_dataset(path: Path, tokenizer, fmt: str = "auto", max_seq_len: int = 512, train_on_prompt: bool = False,
                 chat_template: bool = True, prompt_style: str = "template", too_long: str = "truncate",
                 split: str | None = None) -> Dataset:
    """Read, check and encode one file; errors name the file, the line and what to change. `split`: an HF
    split slice of the file's records (splits.py); `too_long`: cut an over-long example, or drop it (Axolotl)."""
    records = apply_split(read_records(path), split, str(path))
    refuse_training_signal(records[0], path)
    fmt = detect_format(records, path, fmt)
    stats = DataStats()
    examples = []
    shortest, answered = None, 0
    for number, record in enumerate(records, start=1):
        try:
            full = encode_record(tokenizer, record, fmt, train_on_prompt, chat_template, prompt_style)
        except DataError as exc:
            raise DataError(f"{path}, record {number}: {exc}") from None
        shortest = min(shortest or len(full.input_ids), len(full.input_ids))
        answered += any(label != IGNORE_INDEX for label in full.labels[1:])
        if too_long == "drop" and len(full.input_ids) > max_seq_len:
            stats.dropped += 1
            continue
        example = truncate(full, max_seq_len)
        if record.get("group") is not None:
            example.group = str(record["group"])
        if record.get("answer") and example.reference is not None:  # the part a generation must contain
            example.reference = str(record["answer"])
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):  # label 0 is never predicted
            stats.dropped += 1
            stats.truncated += example.truncated
            continue
        stats.add(example)
        examples.append(example)
    if not examples and not answered:
        raise DataError(f"{path}: no example has anything to learn: none has an assistant turn with loss (format "
                        f"{fmt!r}; roles must be user/assistant (or human/gpt), and an assistant turn with weight 0 "
                        "is context only).")
    if not examples:
        where = " (data.too_long: drop)" if too_long == "drop" else " before their first answer token"
        raise DataError(f"{path}: all {len(records)} examples are longer than data.max_seq_len={max_seq_len}{where} "
                        f"(the shortest has {shortest} tokens); raise data.max_seq_len.")
    return Dataset(examples, stats, fmt)


def refuse_training_signal(record: dict, path: Path) -> None:
    """Data made for another kind of training, which read as SFT would train something else: preference pairs
    (DPO/ORPO: chosen / rejected), KTO's good/bad labels."""
    if "chosen" in record and "rejected" in record:
        raise DataError(f"{path}: a preference data set (each record has 'chosen' and 'rejected'); it trains with DPO / "
                        "ORPO, which lorakit does not run yet. Read as supervised data it would train on one side "
                        "only; give SFT data (messages, alpaca, …) instead.")
    if isinstance(record.get("label"), bool) or "kto_tag" in record:
        raise DataError(f"{path}: a KTO data set (each answer labelled desirable or not); lorakit trains supervised "
                        "fine-tuning only, which would learn the undesirable answers too. Give SFT data instead.")


def concat(parts: list[Dataset]) -> Dataset:
    """Several files read as one data set (each file's format detected on its own)."""
    if len(parts) == 1:
        return parts[0]
    stats = DataStats()
    for part in parts:
        for name, value in vars(part.stats).items():
            setattr(stats, name, max(getattr(stats, name), value) if name == "longest" else getattr(stats, name) + value)
    formats = sorted({part.format for part in parts})
    return Dataset([e for part in parts for e in part.examples], stats, "+".join(formats))


def split_eval(data: Dataset, share: float | int, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `share` of the examples — a fraction, or a count (an int) — at least one, and at least one left
    to train on. A share of 0 holds out nothing: the eval set is then empty (the job says so)."""
    if not share:
        return data, Dataset([], DataStats(), data.format)
    if len(data.examples) < 2:
        raise DataError("data.eval is not set and the training set has a single example; add data.eval or more data.")
    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    wanted = share if isinstance(share, int) else round(share * len(order))
    count = min(max(1, wanted), len(order) - 1)
    held, kept = sorted(order[:count]), sorted(order[count:])
    parts = []
    for indices in (kept, held):
        part = Dataset([data.examples[i] for i in indices], DataStats(), data.format)
        for example in part.examples:
            part.stats.add(example)
        part.stats.truncated = sum(e.truncated for e in part.examples)
        parts.append(part)
    parts[0].stats.dropped = data.stats.dropped
    return parts[0], parts[1]
