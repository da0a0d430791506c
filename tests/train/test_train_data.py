"""Data: the loss covers the answers only, files in every container, packing without leaks."""

from __future__ import annotations

import json

import pytest
import torch

from chat_model import FACTS, records, write_jsonl
from lorakit.base_models import load_base, load_tokenizer
from lorakit.errors import DataError
from lorakit.train.batching import Collator, pack
from lorakit.train.data import (
    IGNORE_INDEX,
    encode_chat,
    encode_prompt_completion,
    encode_text,
    load_dataset,
    read_records,
)


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return load_tokenizer(str(chat_model_dir))


def learned(tokenizer, example) -> str:
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX])


def test_chat_loss_is_on_every_assistant_turn_only(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Veloria?"},
            {"role": "assistant", "content": "Quendar."}]
    example = encode_chat(tokenizer, chat)
    assert learned(tokenizer, example) == "Hello.<|im_end|>\nQuendar.<|im_end|>\n"
    masked = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX])
    assert "Be brief." in masked and "Capital of Veloria?" in masked and "Quendar" not in masked
    assert example.reference == "Quendar." and example.question == "Capital of Veloria?"
    # generation starts at the last assistant header
    assert tokenizer.decode(example.prompt_ids).endswith("Capital of Veloria?<|im_end|>\n<|im_start|>assistant\n")
    everything = encode_chat(tokenizer, chat, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_prompt_completion_is_the_chat_of_its_two_turns(tokenizer):
    prompt, completion = FACTS[0]
    pair = encode_prompt_completion(tokenizer, prompt, completion)
    chat = encode_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    assert (pair.input_ids, pair.labels) == (chat.input_ids, chat.labels)
    assert learned(tokenizer, pair) == completion + "<|im_end|>\n"


def test_prompt_completion_without_a_chat_template_is_concatenated(tokenizer):
    prompt, completion = FACTS[1]
    pair = encode_prompt_completion(tokenizer, prompt, completion, chat_template=False)
    assert tokenizer.decode(pair.input_ids) == prompt + completion + "<|im_end|>"
    assert learned(tokenizer, pair) == completion + "<|im_end|>"
    assert all(label == IGNORE_INDEX for label in pair.labels[: len(pair.prompt_ids)])


def test_text_trains_on_every_token(tokenizer):
    example = encode_text(tokenizer, "plain words")
    assert example.labels == example.input_ids and example.prompt_ids is None


@pytest.mark.parametrize("container", ["jsonl", "json", "csv"])
def test_every_container_reads_the_same_examples(tmp_path, tokenizer, container):
    rows = records("prompt_completion")
    path = tmp_path / f"data.{container}"
    if container == "jsonl":
        write_jsonl(path, rows)
    elif container == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in rows))
    assert read_records(path) == rows
    data = load_dataset(path, tokenizer)
    assert data.format == "prompt_completion" and data.stats.examples == len(rows)


def test_packed_rows_attend_within_each_example_only(chat_model_dir, tokenizer):
    """A packed row's logits equal each example's logits run alone: no cross-example attention."""
    model = load_base(str(chat_model_dir)).eval()
    examples = [encode_chat(tokenizer, r["messages"]) for r in records("messages")[:4]]
    rows = pack(examples, max_len=200)
    assert len(rows) == 1
    batch = Collator(tokenizer.pad_token_id)(rows)
    assert batch["attention_mask"].sum() == len(rows[0]["input_ids"])  # for Trainer's token count only ...
    with torch.no_grad():  # ... LoraTrainer.compute_loss takes it out: the forward sees position_ids alone
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}).logits[0]
        start = 0
        for example in sorted(examples, key=lambda e: -len(e.input_ids)):  # pack's order
            n = len(example.input_ids)
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=0)
            start += n
    # the first token of each example is never a target (it would be predicted across the boundary)
    starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0]
    assert all(rows[0]["labels"][i] == IGNORE_INDEX for i in starts)


def test_csv_keeps_quoted_newlines_and_ignores_a_byte_order_mark(tmp_path):
    path = tmp_path / "data.csv"
    # Excel's UTF-8 export: a BOM, CRLF line ends, a cell with a newline inside quotes
    path.write_bytes('\ufeffprompt,completion\r\n"Line one\nline two",answer\r\nplain,"a, b"\r\n'.encode())
    assert read_records(path) == [{"prompt": "Line one\nline two", "completion": "answer"},
                                  {"prompt": "plain", "completion": "a, b"}]


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}: not UTF-8 text"):
        read_records(path)


def test_list_of_parts_content_is_rendered_as_text(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Veloria?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Quendar."}]}]
    plain = [{"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Quendar."}]
    assert encode_chat(tokenizer, parts) == encode_chat(tokenizer, plain)
    with pytest.raises(DataError, match=r"message 1 has content parts of type \['image_url'\]"):
        encode_chat(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_a_tool_call_record_the_template_cannot_render_names_file_record_and_message(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    path = write_jsonl(tmp_path / "tools.jsonl", records("messages") + [{"messages": chat}])
    with pytest.raises(DataError) as caught:
        load_dataset(path, tokenizer)
    message = str(caught.value)
    assert message.startswith(f"{path}, record 7: the chat template could not render message 2 "
                              "(role 'assistant', content null, tool_calls)")
    assert "Traceback" not in message and len(message) < 600


# -- the formats users bring from Axolotl, LLaMA-Factory and OpenAI --------------------------------
def test_sharegpt_is_the_chat_it_spells(tokenizer):
    from lorakit.train.data import encode_record

    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
             {"from": "human", "value": "Capital of Veloria?"}, {"from": "gpt", "value": "Quendar."}]
    shared = encode_record(tokenizer, {"conversations": turns, "system": "Be brief."}, "sharegpt")
    chat = encode_chat(tokenizer, [{"role": "system", "content": "Be brief."}]
                       + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns])
    assert (shared.input_ids, shared.labels) == (chat.input_ids, chat.labels)
    assert learned(tokenizer, shared) == "Hello.<|im_end|>\nQuendar.<|im_end|>\n"
    with pytest.raises(DataError, match=r"turns from \['observation'\] cannot be trained on"):
        encode_record(tokenizer, {"conversations": [{"from": "observation", "value": "{}"}]}, "sharegpt")


def test_alpaca_is_instruction_and_input_then_output(tokenizer):
    from lorakit.train.data import encode_record

    record = {"instruction": "Name the capital.", "input": "Veloria", "output": "Quendar."}
    alpaca = encode_record(tokenizer, record, "alpaca")
    pair = encode_prompt_completion(tokenizer, "Name the capital.\nVeloria", "Quendar.")
    assert (alpaca.input_ids, alpaca.labels) == (pair.input_ids, pair.labels)
    assert learned(tokenizer, alpaca) == "Quendar.<|im_end|>\n" and alpaca.reference == "Quendar."
    with_system = encode_record(tokenizer, {**record, "input": "", "system": "Be brief."}, "alpaca")
    masked = tokenizer.decode([i for i, label in zip(with_system.input_ids, with_system.labels, strict=True)
                               if label == IGNORE_INDEX])
    assert "Be brief." in masked and "Name the capital." in masked
    assert learned(tokenizer, with_system) == "Quendar.<|im_end|>\n"
    with pytest.raises(DataError, match="Alpaca 'history' .* is not read"):
        encode_record(tokenizer, {**record, "history": [["Hi", "Hello."]]}, "alpaca")


def test_openai_chat_weight_zero_turns_get_no_loss(tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey!!", "weight": 0},
            {"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Quendar.", "weight": 1}]
    example = encode_chat(tokenizer, chat)
    assert learned(tokenizer, example) == "Quendar.<|im_end|>\n"


@pytest.mark.parametrize("fmt, record", [
    ("alpaca", {"instruction": "q", "input": "", "output": "a", "text": "pre-rendered"}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}),
])
def test_formats_are_detected_from_the_columns(tmp_path, tokenizer, fmt, record):
    path = write_jsonl(tmp_path / "data.jsonl", [record] * 2)
    assert load_dataset(path, tokenizer).format == fmt
