"""Axolotl and LLaMA-Factory configs, written out as their documentation shows them: imported
key by key (the mapping table asserted), then trained for 2 steps on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chat_model import FACTS
from lorakit.cli import app
from lorakit.errors import ConfigError
from lorakit.train.config import load_job_config
from lorakit.train.foreign import detect, to_lorakit

HERE = Path(__file__).parent / "foreign_configs"
runner = CliRunner()
ALPACA = [{"instruction": q, "input": "", "output": a} for q, a in FACTS]


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def axolotl_config(tmp_path: Path, model_dir: Path, **changes) -> Path:
    raw = yaml.safe_load((HERE / "axolotl_qlora.yml").read_text())
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    raw |= {"base_model": str(model_dir), "datasets": [{"path": "alpaca.jsonl", "type": "alpaca"}], **changes}
    path = tmp_path / "qlora.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def llamafactory_config(tmp_path: Path, model_dir: Path, **changes) -> Path:
    raw = yaml.safe_load((HERE / "llamafactory_lora_sft.yaml").read_text())
    data = tmp_path / "data"
    data.mkdir()
    (data / "identity.json").write_text(json.dumps(ALPACA[:3]))
    (data / "alpaca_en_demo.json").write_text(json.dumps(ALPACA[3:]))
    (data / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"},
                                                        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(yaml.safe_dump(raw | {"model_name_or_path": str(model_dir), **changes}, sort_keys=False))
    return path


def imported(config: Path, mapped: dict[str, str], ignored: list[str]) -> tuple[dict, dict]:
    """`lorakit config import --json`'s report and its rows by key, the table asserted key by key:
    exactly `mapped` (their key → ours) and exactly `ignored`."""
    code, output = invoke("config", "import", config, "--json")
    assert code == 0, output
    report = json.loads(output)
    rows = {row["key"]: (row["status"], row["target"]) for row in report["rows"]}
    assert {k: v for k, v in rows.items() if v[0] == "mapped"} == {k: ("mapped", t) for k, t in mapped.items()}
    assert sorted(k for k, v in rows.items() if v[0] == "ignored") == sorted(ignored)
    return report, rows


AXOLOTL_MAPPED = {
    "base_model": "model", "load_in_4bit": "quantize", "datasets": "data.train", "datasets[].type": "data.format",
    "datasets[].type (prompt)": "data.prompt_style", "val_set_size": "data.eval_fraction",
    "output_dir": "output_dir", "sequence_len": "data.max_seq_len", "sample_packing": "data.packing",
    "lora_r": "lora.r", "lora_alpha": "lora.lora_alpha", "lora_dropout": "lora.lora_dropout",
    "lora_target_linear": "lora.target_modules", "gradient_accumulation_steps": "train.grad_accum",
    "micro_batch_size": "train.batch_size", "num_epochs": "train.epochs", "optimizer": "train.optimizer",
    "lr_scheduler": "train.lr_scheduler", "learning_rate": "train.learning_rate",
    "train_on_inputs": "data.train_on_prompt", "bf16": "train.bf16", "gradient_checkpointing": "train.gradient_checkpointing",
    "logging_steps": "train.logging_steps", "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay",
}
AXOLOTL_IGNORED = ["model_type", "tokenizer_type", "load_in_8bit", "strict", "dataset_prepared_path",
                   "adapter", "lora_model_dir", "pad_to_sequence_len", "lora_target_modules", "lora_fan_in_fan_out",
                   "wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "group_by_length",
                   "fp16", "tf32", "early_stopping_patience", "resume_from_checkpoint", "local_rank",
                   "xformers_attention", "flash_attention", "evals_per_epoch", "eval_table_size", "saves_per_epoch",
                   "debug", "deepspeed", "fsdp", "fsdp_config", "special_tokens"]


def test_axolotl_qlora_example_maps_key_by_key_and_trains(tmp_path, wide_chat_model_dir):
    config = axolotl_config(tmp_path, wide_chat_model_dir)
    report, _ = imported(config, AXOLOTL_MAPPED, AXOLOTL_IGNORED)
    assert report["dialect"] == "axolotl"
    written = yaml.safe_load(Path(report["written"]).read_text())
    assert written["quantize"] == "nf4" and written["lora"] == {"r": 32, "lora_alpha": 16, "lora_dropout": 0.05,
                                                                "target_modules": "all-linear"}
    assert written["train"]["optimizer"] == "paged_adamw_32bit" and written["train"]["epochs"] == 4
    assert written["train"]["bf16"] == "auto"  # decided when the run starts, on the machine that trains
    assert written["data"] == {"train": str(tmp_path / "alpaca.jsonl"), "format": "alpaca", "prompt_style": "alpaca",
                               "eval_fraction": 0.0, "max_seq_len": 4096, "packing": True, "train_on_prompt": False,
                               "too_long": "drop"}
    # the imported YAML and the Axolotl file itself resolve to the same job
    assert load_job_config(report["written"]).to_dict() == load_job_config(config).to_dict()

    # paged optimizers need CUDA: on this CPU the user switches to adamw, as the table's note says
    code, output = invoke("train", config, "--set", "train.optimizer=adamw", "--set", "train.epochs=2")
    assert code == 0, output
    summary = json.loads((tmp_path / "outputs" / "qlora-out" / "summary.json").read_text())
    assert summary["run"]["steps"] == 2 and summary["quantize"] == "nf4" and summary["data"]["format"] == "alpaca"
    assert summary["adapter"]["r"] == 32 and summary["data"]["packed_rows"] == 1


LLAMAFACTORY_MAPPED = {
    "model_name_or_path": "model", "lora_rank": "lora.r", "lora_target": "lora.target_modules",
    "dataset": "data.train", "dataset (formatting)": "data.format", "cutoff_len": "data.max_seq_len",
    "output_dir": "output_dir", "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.learning_rate", "num_train_epochs": "train.epochs", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_ratio": "train.warmup_ratio", "bf16": "train.bf16", "val_size": "data.eval_fraction",
    "per_device_eval_batch_size": "eval.batch_size", "eval_steps": "train.eval_steps", "max_samples": "data.train_split",
}
LLAMAFACTORY_IGNORED = ["trust_remote_code", "stage", "do_train", "finetuning_type", "template",
                        "overwrite_cache", "preprocessing_num_workers", "plot_loss", "overwrite_output_dir",
                        "ddp_timeout", "eval_strategy"]


def test_llamafactory_lora_sft_example_maps_key_by_key_and_trains(tmp_path, chat_model_dir):
    config = llamafactory_config(tmp_path, chat_model_dir)
    report, rows = imported(config, LLAMAFACTORY_MAPPED, LLAMAFACTORY_IGNORED)
    assert report["dialect"] == "llamafactory"
    # LLaMA-Factory's own defaults, written out where ours differ
    assert {k for k, v in rows.items() if v[0] == "default"} == {"(lora.lora_dropout)", "(lora.lora_alpha)"}
    written = yaml.safe_load(Path(report["written"]).read_text())
    assert written["lora"] == {"r": 8, "target_modules": "all-linear", "lora_dropout": 0.0, "lora_alpha": 16}
    assert written["data"]["train"] == [str(tmp_path / "data" / "identity.json"),
                                        str(tmp_path / "data" / "alpaca_en_demo.json")]

    code, output = invoke("train", config, "--set", "train.epochs=null", "--set", "train.max_steps=2",
                          "--set", "train.bf16=false")
    assert code == 0, output
    summary = json.loads((tmp_path / "saves" / "llama3-8b" / "lora" / "sft" / "summary.json").read_text())
    assert summary["run"]["steps"] == 2 and summary["data"]["format"] == "alpaca"
    assert summary["data"]["train"]["examples"] + summary["data"]["eval"]["examples"] == len(ALPACA)
    assert (summary["adapter"]["r"], summary["adapter"]["lora_alpha"], summary["adapter"]["lora_dropout"]) == (8, 16, 0.0)


@pytest.mark.parametrize("changes, expected", [
    ({"lora_rr": 8}, "unknown key(s) 'lora_rr' (did you mean 'lora_r'?)"),
    ({"adapter": "ia3"}, "lorakit trains LoRA adapters here"),
    ({"lora_model_dir": "./old-adapter"}, "continuing from an existing adapter is not supported"),
    ({"datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}]}, "lorakit reads local JSON, JSONL or CSV files and "
                                                                      "never downloads data"),
    ({"datasets": [{"path": "alpaca.jsonl", "type": "input_output"}]}, "lorakit reads alpaca, alpaca:chat, chat_template"),
    ({"learning_rate": "fast"}, "train.learning_rate"),
])
def test_axolotl_keys_lorakit_cannot_honour_are_refused(tmp_path, chat_model_dir, changes, expected):
    config = axolotl_config(tmp_path, chat_model_dir, **changes)
    with pytest.raises(ConfigError) as info:
        load_job_config(config)
    assert expected in str(info.value)


def test_llamafactory_refusals_name_the_fix(tmp_path, chat_model_dir):
    for changes, expected in [({"stage": "dpo"}, "supervised fine-tuning only"),
                              ({"finetuning_type": "full"}, "finetuning_type: lora"),
                              ({"dataset": "identity,missing"}, "dataset: 'missing': not in"),
                              ({"lora_ranks": 8}, "did you mean 'lora_rank'")]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        with pytest.raises(ConfigError, match=expected):
            load_job_config(llamafactory_config(folder, chat_model_dir, **changes))


def test_a_hub_model_name_says_how_to_get_it_offline(tmp_path):
    from lorakit.base_models import resolve_model_path
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match=r"huggingface-cli download NousResearch/Meta-Llama-3-8B --local-dir "
                                           r"models/Meta-Llama-3-8B`\), then set model: models/Meta-Llama-3-8B"):
        resolve_model_path("NousResearch/Meta-Llama-3-8B")


def test_dialect_detection_leaves_our_own_configs_alone(tmp_path):
    assert detect({"base_model": "x", "datasets": []}) == "axolotl"
    assert detect({"model_name_or_path": "x", "stage": "sft"}) == "llamafactory"
    # ours with a stray foreign key: our own "did you mean" instead of a silent import
    assert detect({"base_model": "x", "train": {"max_steps": 3}}) == "lorakit"
    assert to_lorakit({"model": "m", "data": {"train": "t"}}, tmp_path / "x.yaml").config == {"model": "m",
                                                                                            "data": {"train": "t"}}


def test_config_keys_lists_what_an_import_knows():
    code, output = invoke("config", "keys", "axolotl")
    assert code == 0 and "lora_target_linear" in output.split() and "micro_batch_size" in output.split()
    code, output = invoke("config", "keys", "unsloth")
    assert code == 2 and "dialect must be one of axolotl, llamafactory" in output


def test_import_refuses_a_lorakit_config(tmp_path, chat_model_dir):
    from chat_model import job_yaml

    code, output = invoke("config", "import", job_yaml(tmp_path, chat_model_dir))
    assert code == 2 and "is not an Axolotl or LLaMA-Factory config" in " ".join(output.split())


@pytest.mark.parametrize("entry, expected", [
    ({"file_name": "chats.json", "formatting": "sharegpt"}, "sharegpt"),
    ({"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}, "messages"),
    ({"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "messages"}}, None),
    ({"file_name": "chats.json", "columns": {"prompt": "question", "response": "answer"}}, None),
    ({"file_name": "chats.json", "columns": {"history": "history"}}, None),
])
def test_llamafactory_dataset_info_layouts_read_as_they_are_or_refused(tmp_path, chat_model_dir, entry, expected):
    config = llamafactory_config(tmp_path, chat_model_dir, dataset="chats")
    info = tmp_path / "data" / "dataset_info.json"
    info.write_text(json.dumps({"chats": entry}))
    (tmp_path / "data" / "chats.json").write_text("[]")
    if expected is None:
        with pytest.raises(ConfigError, match="rename the file's fields"):
            to_lorakit(yaml.safe_load(config.read_text()), config)
    else:
        assert to_lorakit(yaml.safe_load(config.read_text()), config).config["data"]["format"] == expected
