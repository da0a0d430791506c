"""Every config and data error the job names, with its message checked."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from chat_model import job_yaml, records, write_jsonl
from lorakit.base_models import load_tokenizer
from lorakit.cli import app
from lorakit.errors import ConfigError, DataError
from lorakit.train.config import load_job_config
from lorakit.train.job import build_data

runner = CliRunner()


def write(tmp_path, config: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_of(tmp_path, chat_model_dir, **sections) -> str:
    """The CLI's error output for a job config (exit code 2, nothing trained)."""
    config = job_yaml(tmp_path, chat_model_dir, **sections)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "run" / "adapter").exists()
    return " ".join(result.output.split())


@pytest.mark.parametrize("raw, expected", [
    ({"modle": "x"}, "Unknown key 'modle'. Did you mean 'model'?"),
    ({"train": {"lr": 1e-3}}, "Unknown key 'train.lr'. Did you mean 'learning_rate'?"),
    ({"train": {"max_step": 3}}, "Did you mean 'max_steps'?"),
    ({"data": {"sequence_len": 3}}, "Did you mean 'max_seq_len'?"),
    ({"lora": {"rank": 8}}, "lora: LoraConfig has no field 'rank'. Did you mean 'r'?"),
    ({"train": {"max_steps": "many"}}, "train.max_steps must be int or null, got 'many'"),
    ({"train": {"max_steps": 0}}, "train.max_steps must be > 0"),
    ({"quantize": "nf5"}, "quantize must be one of null, nf4, fp4, int8; got 'nf5'. Did you mean 'nf4'?"),
    ({"data": {"format": "chat"}}, "data.format must be one of auto, messages, prompt_completion, text"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer must be one of"),
    ({"data": {"train": None}}, "data.train is required"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, raw, expected):
    config = {"data": {"train": "x.jsonl"}} | raw
    if "data" in raw:
        config["data"] = {"train": "x.jsonl"} | raw["data"]
    with pytest.raises(ConfigError) as info:
        load_job_config(write(tmp_path, config))
    assert expected in str(info.value)


def test_yaml_spellings_and_overrides(tmp_path):
    path = write(tmp_path, {"data": {"train": "x.jsonl"}, "train": {"learning_rate": "2e-4", "max_steps": 5}})
    config = load_job_config(path, ["train.max_steps=7", "lora.r=4", "quantize=nf4", "data.packing=true"])
    assert config.train.learning_rate == 2e-4 and config.train.max_steps == 7
    assert config.lora["r"] == 4 and config.quantize == "nf4" and config.data.packing is True
    assert config.lora_config().r == 4
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_job_config(path, ["train.max_steps"])


def test_missing_data_file(tmp_path, chat_model_dir):
    message = error_of(tmp_path, chat_model_dir, data={"train": "nowhere/train.jsonl"})
    # relative to the YAML's folder (item 12 of the defects issue: one rule for every path)
    assert f"data.train: file '{tmp_path / 'nowhere' / 'train.jsonl'}' not found (relative paths" in message


def test_jsonl_line_that_does_not_parse_names_file_and_line(tmp_path, chat_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    message = error_of(tmp_path, chat_model_dir, data={"train": str(bad), "eval": None})
    assert f"{bad}, line 3: not valid JSON" in message


def test_columns_that_fit_no_format_are_listed(tmp_path, chat_model_dir):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    message = error_of(tmp_path, chat_model_dir, data={"train": str(odd)})
    assert "the columns ['answer', 'question'] fit no data format" in message


def test_a_record_missing_a_column_is_named(tmp_path, chat_model_dir):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2"}])
    message = error_of(tmp_path, chat_model_dir, data={"train": str(mixed)})
    assert "record 2: format 'prompt_completion' needs ['prompt', 'completion']; missing ['completion']" in message


def test_empty_data_set(tmp_path, chat_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "the data set is empty" in error_of(tmp_path, chat_model_dir, data={"train": str(empty)})


def test_all_examples_longer_than_max_seq_len(tmp_path, chat_model_dir):
    message = error_of(tmp_path, chat_model_dir, data={"max_seq_len": 4})
    assert "are longer than data.max_seq_len=4 before their first answer token" in message
    assert "raise data.max_seq_len" in message


def test_truncation_is_counted_and_loss_free_leftovers_dropped(tmp_path, chat_model_dir):
    tokenizer = load_tokenizer(str(chat_model_dir))
    long = records("prompt_completion") + [{"prompt": "What is " + "the " * 40 + "capital?", "completion": "None."}]
    data = write_jsonl(tmp_path / "long.jsonl", long)
    config = load_job_config(job_yaml(tmp_path, chat_model_dir, data={"train": str(data), "eval": None,
                                                                      "max_seq_len": 30}))
    train, evaluation = build_data(config, tokenizer)
    total = train.stats.examples + evaluation.stats.examples
    assert total == len(long) - 1 and train.stats.dropped == 1 and train.stats.truncated >= 1
    assert max(len(e.input_ids) for e in train.examples + evaluation.examples) <= 30


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, chat_model_dir):
    tokenizer = load_tokenizer(str(chat_model_dir))
    config = load_job_config(job_yaml(tmp_path, chat_model_dir, data={"eval": None, "eval_fraction": 0.34}))
    train, evaluation = build_data(config, tokenizer)
    again = build_data(config, tokenizer)
    assert len(evaluation) == 2 and len(train) == 4
    assert [e.input_ids for e in evaluation.examples] == [e.input_ids for e in again[1].examples]
    assert not {tuple(e.input_ids) for e in train.examples} & {tuple(e.input_ids) for e in evaluation.examples}


def test_data_error_type_is_a_config_error():
    assert issubclass(DataError, ConfigError)
