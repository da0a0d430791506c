"""Our commands keep third-party noise out, and only the noise: the named message is dropped,
every other line of the same logger still shows, and --verbose shows everything."""

from __future__ import annotations

import logging
import subprocess
import sys

from lorakit.quiet import BNB_KERNELS_LOGGER, BNB_KERNELS_MESSAGE, quiet_third_party


def test_the_bitsandbytes_kernels_message_is_dropped_and_nothing_else(caplog):
    quiet_third_party()
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_KERNELS_LOGGER):
        logger.warning(BNB_KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "No module")
        logger.warning("a real bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]


SCRIPT = """
import logging, sys
from lorakit.cli import app
logging.basicConfig()
sys.argv = ["lorakit", *sys.argv[1:], "plan", "--params", "7B"]
import lorakit.quiet
real = lorakit.quiet.quiet_third_party
def then_log(verbose=False):
    real(verbose)
    logging.getLogger(lorakit.quiet.BNB_KERNELS_LOGGER).warning(lorakit.quiet.BNB_KERNELS_MESSAGE + ": x")
lorakit.quiet.quiet_third_party = then_log
app(prog_name="lorakit")
"""


def test_commands_install_the_filter_and_verbose_does_not():
    quiet = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", SCRIPT, "--verbose"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "memory plan" in quiet.stdout and BNB_KERNELS_MESSAGE not in quiet.stderr
    assert BNB_KERNELS_MESSAGE in loud.stderr


def test_a_qlora_job_with_checkpointing_and_bf16_prints_no_warning_we_cause(tmp_path, wide_chat_model_dir):
    """The arguments lorakit passes to transformers (activation checkpointing, warm-up, the KV cache
    of the fused loss) use the names the installed version takes: no FutureWarning, no raw dicts."""
    from chat_model import job_yaml

    config = job_yaml(tmp_path, wide_chat_model_dir, quantize="nf4",
                      train={"gradient_checkpointing": True, "bf16": True, "warmup_ratio": 0.25})
    result = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "deprecated" not in result.stdout + result.stderr, result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("{'")]
    assert "step 4/4  loss" in result.stdout


def test_verbose_keeps_the_trainers_own_log_lines(tmp_path, chat_model_dir):
    from chat_model import job_yaml

    config = job_yaml(tmp_path, chat_model_dir)
    result = subprocess.run([sys.executable, "-m", "lorakit", "--verbose", "train", str(config)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("{'loss'")]
