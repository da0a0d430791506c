"""`method:` in the job's YAML: every method trains end to end on the tiny chat model, its adapter
loads back (in PEFT too, where PEFT has the method) and `lorakit inspect` describes it; AdaLoRA's
allocator runs in the job and its rank pattern is saved; a section for another method is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from chat_model import job_yaml
from lorakit.cli import app
from lorakit.errors import ConfigError
from lorakit.train.config import load_job_config

runner = CliRunner()
SECTIONS = {
    "ia3": {},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
    "bottleneck": {"reduction_factor": 4},
}
PEFT_HAS = {"ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "adalora"}


@pytest.mark.parametrize("method", SECTIONS)
def test_each_method_trains_saves_loads_and_inspects(tmp_path, chat_model_dir, method):
    from transformers import AutoModelForCausalLM

    import lorakit

    config = job_yaml(tmp_path, chat_model_dir, method=method, **{method: SECTIONS[method]},
                      train={"learning_rate": 1e-2})
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["run"]["trainable"] > 0
    assert summary["comparison"]["adapter"]["loss"] < summary["comparison"]["base"]["loss"]  # it learned
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if method == "adalora":
        assert saved["total_step"] == 4 and saved["rank_pattern"]  # filled in by the job, allocated by its callback
        assert sum(map(sum, saved["rank_pattern"].values())) == 2 * len(saved["rank_pattern"])
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    ours = lorakit.PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    if method in PEFT_HAS:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model_dir),
                                                    run / "adapter").eval()
            with torch.no_grad():
                torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    shown = runner.invoke(app, ["inspect", str(run / "adapter")])
    assert shown.exit_code == 0, shown.output
    assert saved["peft_type"] in shown.output
    assert saved["peft_type"] in (run / "report.md").read_text()


def test_a_section_for_another_method_is_refused_and_sections_take_defaults(tmp_path, chat_model_dir):
    config = job_yaml(tmp_path, chat_model_dir, method="ia3", prompt_tuning={"num_virtual_tokens": 3})
    with pytest.raises(ConfigError, match="prompt_tuning: section but trains method: ia3"):
        load_job_config(config)
    config = job_yaml(tmp_path, chat_model_dir, adalora={"init_r": 4})  # method: lora (default)
    with pytest.raises(ConfigError, match="set method: adalora"):
        load_job_config(config)
    config = job_yaml(tmp_path, chat_model_dir, method="prefix_tuning", prefix_tuning={"num_virtual_tokenz": 3})
    with pytest.raises(ConfigError, match="prefix_tuning: PrefixTuningConfig has no field 'num_virtual_tokenz'"):
        load_job_config(config)
    job = load_job_config(job_yaml(tmp_path, chat_model_dir, method="bottleneck"))
    assert job.adapter_config().reduction_factor == 16 and job.adapter_config().architecture == "houlsby"
