"""The tools our users point at a server, run unchanged against `lorakit serve` (issue 31): EleutherAI's
`lm-eval` (a generate_until task through local-chat-completions, a multiple-choice task through
local-completions with --batch_size 4, its tokenizer found on the server) and vLLM's load tester
`guidellm` (a bounded streaming run, its default request body) — plus the adapter-cache thrash count.

lm-eval's numbers are checked against an in-process PEFT model of the same adapter: every choice's
loglikelihood within 1e-4, the accuracy exactly, every generation token for token.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from chat_model import build_chat_model, save_adapter
from lorakit.http.process import ServerProcess

TASKS = Path(__file__).parent / "lm_eval_tasks"
README = Path(__file__).resolve().parents[2] / "README.md"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": "-"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("clients")
    model_dir = build_chat_model(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    folder = save_adapter(base, tmp / "root" / "alpha", 1)
    return {"tmp": tmp, "model": model_dir, "base": base, "alpha": folder,
            "tokenizer": AutoTokenizer.from_pretrained(model_dir)}


@pytest.fixture(scope="module")
def server(files):
    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(files["alpha"].parent),
                       "--max-model-len", "160", "--max-num-seqs", "8", "--kv-cache-memory", "32") as process:
        yield process


@pytest.fixture(scope="module")
def peft_alpha(files):
    import peft

    return peft.PeftModel.from_pretrained(copy.deepcopy(files["base"]), files["alpha"]).eval()


def readme_command(server, starts: str, **swaps: str) -> list[str]:
    """The README's own command line that starts with `starts` (its serving section), pointed at this server,
    this adapter and these small settings — so the commands the README shows are the ones tested."""
    text = README.read_text().split("## The server: `lorakit serve`")[1].split("\n## ")[0]
    lines = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith(starts)]
    assert len(lines) == 1, f"the README's serving section should show one `{starts}` command"
    line = lines[0].replace("http://127.0.0.1:8000", server.url).replace("model=support", "model=alpha")
    for old, new in swaps.items():
        assert old in line, f"{old!r} is no longer in the README's {starts} command"
        line = line.replace(old, new)
    argv = shlex.split(line)
    return [str(Path(sys.executable).parent / argv[0]), *argv[1:]]


def _lm_eval(files, server, model: str, task: str, **swaps: str) -> tuple[list[dict], dict]:
    """Run the README's lm-eval command for `model` on a task shipped in tests/serve/lm_eval_tasks; its logged
    samples and results."""
    work = files["tmp"] / f"lm_eval_{task}"
    shutil.copytree(TASKS, work, dirs_exist_ok=True)  # the task's data_files are relative to the working folder
    out = work / "out"
    argv = readme_command(server, f"lm_eval run --model {model} ", **swaps)
    argv += ["--include_path", ".", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(argv, cwd=work, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = next(out.rglob(f"samples_{task}_*.jsonl"))
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
    return [json.loads(line) for line in samples.read_text().splitlines()], results


def test_lm_eval_multiple_choice_loglikelihoods_equal_in_process(files, server, peft_alpha):
    samples, results = _lm_eval(files, server, "local-completions", "lorakit_tiny_mc",
                                **{"--tasks hellaswag": "--tasks lorakit_tiny_mc", "max_length=2048": "max_length=160"})
    tokenizer, correct = files["tokenizer"], 0
    for sample in samples:
        scores = []
        for (context, continuation), (served, _) in zip(
                [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()], sample["filtered_resps"], strict=True):
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            split = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                rows = torch.log_softmax(peft_alpha(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
            mine = sum(rows[t - 1, whole[t]].item() for t in range(split, len(whole)))
            assert abs(float(served) - mine) < 1e-4
            scores.append(mine)
        correct += scores.index(max(scores)) == sample["doc"]["answer"]
    assert len(samples) == 6 and results["acc,none"] == pytest.approx(correct / len(samples))


def test_lm_eval_generate_until_through_chat_equals_in_process_greedy(files, server, peft_alpha):
    samples, _ = _lm_eval(files, server, "local-chat-completions", "lorakit_tiny_gen",
                          **{"--tasks gsm8k": "--tasks lorakit_tiny_gen"})
    tokenizer = files["tokenizer"]
    for sample in samples:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": sample["doc"]["question"]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = peft_alpha.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == expected


def test_guidellm_streams_with_no_errors_and_reports_ttft_and_itl(files, server):
    report = files["tmp"] / "guidellm.json"
    argv = readme_command(server, "guidellm run", **{
        "seconds=30": "seconds=12", "prompt_tokens=256,output_tokens=64": "prompt_tokens=32,output_tokens=16",
        "model=HuggingFaceTB/SmolLM2-135M-Instruct": f"model={files['model']}"})
    argv += ["--output", f"kind=json,path={report}", "--disable-progress"]
    done = subprocess.run(argv, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads(report.read_text())["benchmarks"][0]["metrics"]
    totals = metrics["request_totals"]
    assert totals["errored"] == 0 and totals["successful"] >= 5  # before: 100% of its streamed requests failed
    assert metrics["time_to_first_token_ms"]["successful"]["count"] == totals["successful"]
    assert metrics["inter_token_latency_ms"]["successful"]["mean"] > 0


def test_ten_adapters_in_turn_with_room_for_two_load_each_once(files):
    """30 requests, a0…a9 three times over, all queued at once; --max-cpu-loras 2: 10 loads (one run loaded 87)."""
    root = files["tmp"] / "ten"
    for i in range(10):
        save_adapter(files["base"], root / f"a{i}", 30 + i, r=2)
    names = [f"a{i}" for i in range(10)] * 3

    async def send(url: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "model": name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
                for name in names))
        return [r.json() for r in replies]

    with ServerProcess("--model", str(files["model"]), "--adapter-dir", str(root), "--max-cpu-loras", "2",
                       "--max-num-seqs", "4", "--max-model-len", "64", "--kv-cache-memory", "16") as server:
        replies = asyncio.run(send(server.url))
        metrics = httpx.get(f"{server.url}/metrics").text
    texts = [r["choices"][0]["text"] for r in replies]
    assert texts[:10] == texts[10:20] == texts[20:]  # every round the same adapter answers the same
    loads = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("lorakit_adapter_cache_loads_total"))
    assert loads == 10
