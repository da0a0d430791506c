"""Configs and data from Axolotl and LLaMA-Factory that trained something else than their tool would, without a
word (issue 38) — each pinned by a test that failed before the fix: LLaMA-Factory v1 `value` parts read as
empty text, preference and KTO data trained as SFT, a silent 10% hold-out, our defaults instead of theirs,
lora_target_linear beside lora_target_modules, split slices ignored, Axolotl's Alpaca prompt replaced by the
chat template, `config import` overwriting anything, max_steps beside num_epochs refused, double quantization
forced on, misleading advice, and the noise of int8 and packed runs and of `--nproc` refusals."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from chat_model import FACTS
from lorakit.cli import app
from lorakit.errors import ConfigError, DataError
from lorakit.train.config import load_job_config
from lorakit.train.data import IGNORE_INDEX, load_dataset

CORPUS_DATA = Path(__file__).parent / "foreign_corpus" / "llamafactory" / "data"
ALPACA = [{"instruction": q, "input": "", "output": a} for q, a in FACTS] * 2
runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def axolotl(tmp_path: Path, model_dir: Path, **keys) -> Path:
    data = write(tmp_path / "alpaca.jsonl", ALPACA)
    raw = {"base_model": str(model_dir), "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3,
           "datasets": [{"path": str(data), "type": "alpaca"}], "output_dir": str(tmp_path / "out"), **keys}
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def llamafactory(tmp_path: Path, model_dir: Path, **keys) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "alpaca.json").write_text(json.dumps(ALPACA))
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"}}))
    raw = {"model_name_or_path": str(model_dir), "stage": "sft", "finetuning_type": "lora", "dataset": "alpaca",
           "output_dir": str(tmp_path / "out"), **keys}
    path = tmp_path / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- 1, 2: data read as its tool reads it, or refused as what it is ----------------------------------------------
def test_llamafactory_v1_value_parts_are_trained_as_their_text(tokenizer):
    data = load_dataset(CORPUS_DATA / "v1_sft_demo.jsonl", tokenizer, max_seq_len=512)
    first = data.examples[0]
    text = tokenizer.decode(first.input_ids)
    assert "Hello! I am {{name}}" in text and "hi" in text  # the parts' `value`, not empty strings
    answer = tokenizer.decode([t for t, label in zip(first.input_ids, first.labels, strict=True) if label != IGNORE_INDEX])
    assert "Hello! I am {{name}}" in answer and "hi\n" not in answer  # loss_weight 0 on the user turn: context only


def test_preference_and_kto_data_are_refused_not_trained_as_sft(tokenizer, tmp_path, chat_model_dir):
    with pytest.raises(DataError, match="preference data set"):
        load_dataset(CORPUS_DATA / "dpo_en_demo.json", tokenizer)
    with pytest.raises(DataError, match="KTO data set"):
        load_dataset(CORPUS_DATA / "kto_en_demo.json", tokenizer)
    config = llamafactory(tmp_path, chat_model_dir, dataset_dir=str(CORPUS_DATA), dataset="dpo_en_demo")
    with pytest.raises(ConfigError, match="preference data set"):
        load_job_config(config)


def test_messages_with_sharegpt_roles_are_trained(tokenizer, tmp_path):
    records = [{"messages": [{"role": "human", "content": q}, {"role": "gpt", "content": a}]} for q, a in FACTS]
    data = load_dataset(write(tmp_path / "chats.jsonl", records), tokenizer)
    assert data.stats.examples == len(FACTS) and data.stats.loss_tokens > 0


# -- 3, 4, 5, 9: the tool's own rules and defaults ------------------------------------------------------------------
def test_foreign_configs_hold_out_nothing_by_default_and_counts_are_examples(tmp_path, chat_model_dir):
    job = load_job_config(axolotl(tmp_path, chat_model_dir))
    assert job.data.eval_fraction == 0.0 and job.data.eval_count is None
    assert load_job_config(axolotl(tmp_path, chat_model_dir, val_set_size=3)).data.eval_count == 3
    assert load_job_config(llamafactory(tmp_path, chat_model_dir)).data.eval_fraction == 0.0
    code = runner.invoke(app, ["train", str(axolotl(tmp_path, chat_model_dir, max_steps=1))])
    assert code.exit_code == 0, code.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["train"]["examples"] == len(ALPACA) and summary["comparison"]["on"] == "training"


def test_keys_a_file_leaves_out_get_the_tools_defaults(tmp_path, chat_model_dir):
    job = load_job_config(axolotl(tmp_path, chat_model_dir))
    assert (job.train.batch_size, job.train.epochs, job.lora["lora_dropout"], job.lora["target_modules"]) == \
        (1, 1.0, 0.0, None)  # micro_batch_size 1, num_epochs 1, lora_dropout 0.0, PEFT's per-model targets
    assert job.data.too_long == "drop" and job.train.warmup_ratio == 0.0
    assert load_job_config(llamafactory(tmp_path, chat_model_dir)).data.max_seq_len == 2048  # cutoff_len


def test_lora_target_linear_with_named_modules_is_their_union(tmp_path, chat_model_dir):
    job = load_job_config(axolotl(tmp_path, chat_model_dir, lora_target_linear=True, lora_target_modules=["lm_head"]))
    assert job.lora["target_modules"] == ["all-linear", "lm_head"]
    import lorakit
    from lorakit.base_models import load_base

    model = lorakit.get_peft_model(load_base(str(chat_model_dir)), job.adapter_config())
    saved = model.peft_config["default"].target_modules  # a plain list PEFT reads
    assert "lm_head" in saved and {"q_proj", "down_proj"} <= set(saved) and "all-linear" not in saved


def test_max_steps_beside_num_epochs_wins_and_double_quantization_can_be_off(tmp_path, chat_model_dir):
    job = load_job_config(axolotl(tmp_path, chat_model_dir, num_epochs=3, max_steps=7))
    assert job.train.max_steps == 7 and job.train.epochs is None
    job = load_job_config(llamafactory(tmp_path, chat_model_dir, num_train_epochs=2.0, max_steps=5,
                                       quantization_bit=4, double_quantization=False))
    assert job.train.max_steps == 5 and job.quantize == "nf4" and job.double_quant is False
    from lorakit.base_models import load_base

    layer = load_base(str(chat_model_dir), quantize="nf4", double_quant=job.double_quant).model.layers[0]
    assert layer.self_attn.q_proj.weight.quant_state.nested is False


# -- 6, 7: which examples, and how they are prompted ------------------------------------------------------------------
def test_split_slices_select_the_records_their_tool_would(tmp_path, chat_model_dir, tokenizer):
    path = axolotl(tmp_path, chat_model_dir)
    raw = yaml.safe_load(path.read_text())
    raw["datasets"][0]["split"] = "train[:25%]"
    path.write_text(yaml.safe_dump(raw))
    job = load_job_config(path)
    assert job.data.train_split == "train[:25%]"
    from lorakit.train.job import build_data

    train, _ = build_data(job, tokenizer)
    assert len(train) == 3  # 25% of 12 records, the first ones
    assert load_job_config(llamafactory(tmp_path, chat_model_dir, max_samples=5)).data.train_split == "train[:5]"


def test_axolotl_alpaca_is_prompted_as_axolotl_does(tmp_path, chat_model_dir, tokenizer):
    job = load_job_config(axolotl(tmp_path, chat_model_dir))
    assert job.data.prompt_style == "alpaca"
    data = load_dataset(Path(job.data.train), tokenizer, "alpaca", prompt_style=job.data.prompt_style)
    question, answer = FACTS[0]
    # Axolotl's AlpacaPrompter (PromptStyle.INSTRUCT), no input: its prompt text, to the letter
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{question}\n\n### Response:\n")
    example = data.examples[0]
    assert tokenizer.decode(example.prompt_ids) == expected
    assert tokenizer.decode(example.input_ids) == expected + answer + tokenizer.eos_token
    assert all(label == IGNORE_INDEX for label in example.labels[: len(example.prompt_ids)])


# -- 8: import never loses a file, never writes what would not train ---------------------------------------------------
def test_config_import_refuses_to_overwrite_never_replaces_its_source_and_validates(tmp_path, chat_model_dir):
    source = axolotl(tmp_path, chat_model_dir)
    before = source.read_text()
    mine = tmp_path / "mine.yaml"
    mine.write_text("my own notes\n")
    result = runner.invoke(app, ["config", "import", str(source), "-o", str(mine)])
    assert result.exit_code == 2 and "--force" in result.output and mine.read_text() == "my own notes\n"
    result = runner.invoke(app, ["config", "import", str(source), "-o", str(source), "--force"])
    assert result.exit_code == 2 and "being imported" in result.output and source.read_text() == before
    assert runner.invoke(app, ["config", "import", str(source), "-o", str(mine), "--force"]).exit_code == 0
    bad = axolotl(tmp_path, chat_model_dir, lora_r="sixteen")
    result = runner.invoke(app, ["config", "import", str(bad), "-o", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "lora" in result.output and not (tmp_path / "bad.yaml").exists()


# -- 10: advice that points the right way ------------------------------------------------------------------------------
def test_known_keys_are_not_called_typos_and_sharegpt_spellings_are_read(tmp_path, chat_model_dir):
    job = load_job_config(axolotl(tmp_path, chat_model_dir, eval_sample_packing=True, loss_watchdog_threshold=5.0,
                                  attn_implementation="sdpa", gradient_checkpointing_kwargs={"use_reentrant": False}))
    assert job.train.batch_size == 1
    chats = write(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": a}]} for q, a in FACTS])
    entry = {"path": str(chats), "type": "chat_template", "field_messages": "conversations",
             "message_property_mappings": {"role": "from", "content": "value"}}
    assert load_job_config(axolotl(tmp_path, chat_model_dir, datasets=[entry])).data.format == "sharegpt"
    with pytest.raises(ConfigError) as every:
        load_job_config(axolotl(tmp_path, chat_model_dir, lora_rr=4, micro_batchsize=2, rl="dpo"))
    assert all(word in str(every.value) for word in ("'lora_rr'", "'micro_batchsize'", "rl: 'dpo'", "config keys axolotl"))


# -- 11: noise -------------------------------------------------------------------------------------------------------------
def test_int8_matmul_cast_warning_is_shown_once():
    from lorakit.quiet import BNB_MATMUL_LOGGER, quiet_third_party

    quiet_third_party()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    logger.addHandler(handler)
    try:
        for _ in range(5):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
    finally:
        logger.removeHandler(handler)
    assert len(records) <= 1


def test_packed_rows_count_real_tokens_and_the_forward_never_sees_their_mask(chat_model_dir, tokenizer, caplog,
                                                                            tmp_path):
    import lorakit
    from lorakit.train.batching import Collator, pack
    from lorakit.train.job import training_arguments
    from lorakit.train.trainer import LoraTrainer

    data = load_dataset(write(tmp_path / "facts.jsonl", ALPACA), tokenizer, max_seq_len=64)
    rows = pack(data.examples, 64)
    rows = [max(rows, key=lambda r: len(r["input_ids"])), min(rows, key=lambda r: len(r["input_ids"]))]
    batch = Collator(tokenizer.pad_token_id)(rows)
    real = sum(len(r["input_ids"]) for r in rows)
    from transformers import AutoModelForCausalLM

    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(chat_model_dir), lorakit.LoraConfig(r=2))
    job = load_job_config(None, [f"model={chat_model_dir}", "data.train=x.jsonl", f"output_dir={tmp_path}"])
    trainer = LoraTrainer(model=model, args=training_arguments(job, has_eval=False))
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == real < batch["input_ids"].numel()
    assert "Could not determine" not in caplog.text
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), model(**unmasked).loss, atol=0, rtol=0)


def test_an_nproc_refusal_is_printed_once_without_a_launcher_traceback(tmp_path, chat_model_dir):
    config = axolotl(tmp_path, chat_model_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")  # a previous run: refused without --overwrite
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and output.count("error:") == 1 and "holds a previous run" in output, output
    assert "Traceback" not in output and "ChildFailedError" not in output
