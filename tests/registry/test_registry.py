"""The registry on SQLite and on a real PostgreSQL server: versions, aliases, gates, rollback, the audit log,
content-addressed blobs (dedupe, tamper detection), concurrent pushes and a push killed midway."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from registry_fixtures import backend, postgres, tiny  # noqa: F401 - fixtures
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import BlobIntegrityError, RegistryError, RegistryNotFound
from lorakit.files.format import read_adapter
from lorakit.registry import Registry
from lorakit.registry.gates import Gate


def test_push_resolve_pull_and_identical_pushes_stored_once(backend, tiny, tmp_path):
    url, blobs = backend
    registry = Registry(url, blobs)
    first = registry.push("support", tiny["adapters"]["v1"], alias="staging", notes="first")
    second = registry.push("support", tiny["adapters"]["v2"])
    again = registry.push("support", tiny["adapters"]["v1"])  # same bytes: a new version, the same blob
    assert (first.version, second.version, again.version) == (1, 2, 3)
    assert again.digest == first.digest and len(registry.blobs.digests()) == 2
    assert registry.resolve("support").version == 3  # NAME: the newest
    assert registry.resolve("support:staging").version == 1 and registry.resolve("support@2").digest == second.digest
    assert first.base_model and first.method == "LORA" and first.fingerprint != "none" and first.notes == "first"
    with pytest.raises(RegistryNotFound, match="no alias 'prod'"):
        registry.resolve("support", default_alias="prod")
    pulled = registry.pull("support@2", tmp_path / "pulled")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (tiny["adapters"]["v2"] / name).read_bytes()
    weights = Path(registry.blobs.url(second.digest)) / "adapter_model.safetensors"  # tamper with the stored file
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BlobIntegrityError, match="does not match its digest"):
        registry.pull("support@2", tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()


def test_promote_with_gates_and_regression_check_then_rollback_and_a_complete_log(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    versions = [registry.push("support", tiny["adapters"][f"v{i}"]) for i in (1, 2, 3)]
    scores = {v.digest: {"exact_match": s, "loss": 1 - s} for v, s in zip(versions, (0.5, 0.9, 0.7), strict=True)}
    evaluated: list[str] = []

    def evaluate(info, folder: Path) -> dict:
        evaluated.append(folder.name)
        return scores[folder.name]  # a blob folder is named by its digest

    gate = [Gate.parse("exact_match>=0.5")]
    data = Path("held-out.jsonl")
    assert registry.promote("support@1", "prod", gate, data, evaluate)["previous"] is None
    assert registry.promote("support@2", "prod", gate, data, evaluate)["scores"]["current"]["exact_match"] == 0.5
    with pytest.raises(RegistryError, match="fails its gate"):
        registry.promote("support@1", "canary", [Gate.parse("exact_match>=0.6")], data, evaluate)
    with pytest.raises(RegistryError, match="scores below support@2"):
        registry.promote("support@3", "prod", gate, data, evaluate)
    assert registry.aliases("support") == {"prod": 2}
    registry.promote("support@3", "prod", gate, data, evaluate, allow_regression=True)
    assert registry.show("support@3").metrics["eval:held-out.jsonl"]["exact_match"] == 0.7  # scores recorded
    assert registry.rollback("support", "prod") == {"from": 3, "to": 2}
    assert registry.rollback("support", "prod") == {"from": 2, "to": 1}  # and further back
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("support", "prod")
    actions = [(e["action"], e["version"], e["alias"], e["previous"]) for e in registry.log("support")]
    assert actions == [("push", 1, None, None), ("push", 2, None, None), ("push", 3, None, None),
                       ("promote", 1, "prod", None), ("promote", 2, "prod", 1), ("promote", 3, "prod", 2),
                       ("rollback", 2, "prod", 3), ("rollback", 1, "prod", 2)]


def test_delete_is_refused_while_an_alias_points_at_it_and_gc_removes_unused_blobs(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    one = registry.push("support", tiny["adapters"]["v1"], alias="prod")
    two = registry.push("support", tiny["adapters"]["v2"])
    with pytest.raises(RegistryError, match="support:prod points to"):
        registry.delete("support@1")
    registry.delete("support@2")
    with pytest.raises(RegistryNotFound):
        registry.show("support@2")
    assert registry.gc()["removed_blobs"] == [two.digest] and registry.blobs.digests() == {one.digest}
    assert registry.log("support")[-1]["action"] == "delete"


PUSHER = textwrap.dedent("""
    import sys
    from lorakit.registry import Registry
    url, blobs, folder, hang = sys.argv[1:5]
    registry = Registry(url, blobs, actor="pusher")
    if hang == "1":  # crash injection: the blob is written, the process dies before its row is committed
        import time
        real, calls = registry.transaction, []
        def stall(work):
            calls.append(work)
            if len(calls) == 2:  # the first claimed the blob; this one would record the version
                print("blob written", flush=True)
                time.sleep(600)
            return real(work)
        registry.transaction = stall
    print(registry.push("support", folder).version, flush=True)
""")


def test_eight_concurrent_pushes_get_eight_distinct_versions(backend, tiny):
    url, blobs = backend
    Registry(url, blobs)  # create the tables once, as a deployment would
    folders = [tiny["adapters"][f"v{1 + i % 3}"] for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, url, str(blobs), str(f), "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in folders]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    numbers = sorted(int(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert numbers == list(range(1, 9))
    registry = Registry(url, blobs)
    assert [v.version for v in registry.versions("support")] == numbers
    assert sum(e["action"] == "push" for e in registry.log("support")) == 8


def test_a_push_killed_midway_leaves_the_registry_consistent(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    registry.push("support", tiny["adapters"]["v1"])
    proc = subprocess.Popen([sys.executable, "-c", PUSHER, url, str(blobs), str(tiny["adapters"]["v2"]), "1"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "blob written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [v.version for v in registry.versions("support")] == [1]  # no half version
    assert len(registry.blobs.digests()) == 2  # the orphan blob ...
    assert registry.gc()["removed_blobs"] == []  # ... which a push in flight may still own (the grace period) ...
    assert len(registry.gc(grace=0)["removed_blobs"]) == 1  # ... and gc removes once that has passed
    assert registry.push("support", tiny["adapters"]["v2"]).version == 2
    for version in registry.versions("support"):
        registry.blob_folder(version)  # every version's files verify


def test_cli_verbs_on_the_embedded_registry(tiny, tmp_path):
    runner = CliRunner()
    where = ["--registry", str(tmp_path / "reg")]

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(app, ["registry", *args, *where])
        assert (result.exit_code == 0) == ok, result.output
        return result.stdout if ok else result.output  # stdout: JSON only (progress bars go to stderr)

    assert "pushed support@1" in run("push", "support", str(tiny["adapters"]["v1"]), "--alias", "staging")
    run("push", "support", str(tiny["adapters"]["v2"]), "--notes", "second")
    listed = json.loads(run("list", "--json"))
    assert listed == [{"name": "support", "versions": 2, "latest": 2, "aliases": {"staging": 1}}]
    assert json.loads(run("show", "support:staging", "--json"))["version"] == 1
    assert "support@2" in run("show", "support@2")
    run("pull", "support@1", str(tmp_path / "out"))
    assert read_adapter(tmp_path / "out").config.r == 8
    diff = json.loads(run("diff", "support@1", "support@2", "--json"))
    module = "model.layers.0.self_attn.q_proj"
    a, b = (read_adapter(tiny["adapters"][v]).tensors for v in ("v1", "v2"))
    prefix = f"base_model.model.{module}"
    delta = {v: 8.0 * t[f"{prefix}.lora_B.weight"] @ t[f"{prefix}.lora_A.weight"] for v, t in (("a", a), ("b", b))}
    assert diff["modules"][module]["diff"] == pytest.approx(float((delta["b"] - delta["a"]).norm()), rel=1e-5)
    assert diff["config"] == {} and not diff["same_content"]
    # gates measured for real: `lorakit eval` of each version on the held-out file
    assert "fails its gate" in run("promote", "support@1", "--to", "prod", "--gate", "loss<0.001", "--eval",
                                   str(tiny["eval"]), ok=False)
    promoted = json.loads(run("promote", "support@1", "--to", "prod", "--gate", "loss<1000", "--eval", str(tiny["eval"]),
                              "--json"))
    assert promoted["version"] == 1 and promoted["scores"]["candidate"]["loss"] > 0
    run("promote", "support@2", "--to", "prod", "--allow-regression")
    assert "support:prod -> v1" in run("rollback", "support", "--alias", "prod")
    assert "points to" in run("delete", "support@1", ok=False)
    run("delete", "support@2")
    assert "removed 1 blob" in run("gc")
    actions = [e["action"] for e in json.loads(run("log", "support", "--json"))]
    assert actions == ["push", "alias", "push", "promote", "promote", "rollback", "delete"]
    checked = {r["ref"]: r["match"] for r in json.loads(run("check", "--base", str(tiny["model"]), "--json"))}
    assert checked == {"support@1": True}
    assert json.loads(run("check", "--base", str(tiny["other"]), "--json"))[0]["match"] is False
    assert "is not a reference" in run("show", "bad ref!", ok=False)


def test_registry_folder_from_the_environment(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "env-registry"))
    registry = Registry()
    registry.push("x", tiny["adapters"]["v1"])
    assert (tmp_path / "env-registry" / "registry.db").is_file() and Registry().names() == ["x"]
    monkeypatch.setenv("LORAKIT_REGISTRY", "postgresql://nowhere/db")
    with pytest.raises(RegistryError, match="LORAKIT_REGISTRY_BLOBS"):
        Registry()
    from lorakit.http.process import free_port

    with pytest.raises(RegistryError, match="Cannot open the registry database"):  # at once, not after retries
        Registry(f"postgresql+psycopg://lorakit@127.0.0.1:{free_port()}/db", tmp_path / "blobs")


def test_training_pushes_with_register_and_retrain_reruns_on_another_base(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    from lorakit.files.fingerprint import base_fingerprint
    from lorakit.train.config import load_job_config
    from lorakit.train.job import run_train

    train = tmp_path / "train.jsonl"
    train.write_text(tiny["eval"].read_text())
    config = tmp_path / "job.yaml"
    registry_dir = tmp_path / "reg"
    config.write_text(textwrap.dedent(f"""
        model: {tiny['model']}
        lora: {{r: 4, lora_alpha: 8}}
        data: {{train: {train}, eval: {train}, max_seq_len: 64}}
        train: {{max_steps: 2, batch_size: 2, save_steps: 100, logging_steps: 1}}
        eval: {{max_examples: 2, max_new_tokens: 4, samples: 0}}
        register: {{name: facts, alias: staging, registry: {registry_dir}}}
        output_dir: {tmp_path / 'run'}
    """))
    summary = run_train(load_job_config(config))
    assert summary["registered"] == "facts@1"
    from lorakit.registry.store import Registry

    registry = Registry.open(str(registry_dir), None)
    first = registry.resolve("facts:staging")
    assert first.source_run == str(tmp_path / "run") and first.data_digest and "job" in first.metrics
    assert "max_steps: 2" in registry.train_config("facts@1")
    runner = CliRunner()
    result = runner.invoke(app, ["registry", "retrain", "facts", "--base", str(tiny["other"]), "--output-dir",
                                 str(tmp_path / "retrained"), "--alias", "candidate", "--registry", str(registry_dir),
                                 "--json"])
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)  # with --json the job's own report goes to stderr
    assert second["version"] == 2 and second["parent"] == "facts@1" and second["aliases"] == ["candidate"]
    other = base_fingerprint(LlamaForCausalLM.from_pretrained(tiny["other"]))
    matches = {r["ref"]: r["match"] for r in registry.check(other)}
    assert matches == {"facts@1": False, "facts@2": True}  # the retrained version belongs to the new base


def test_blobs_behind_an_fsspec_url_are_verified_through_a_local_cache(tiny, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    store = f"memory://lorakit-{tmp_path.name}/blobs"
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", store)
    first = registry.push("support", tiny["adapters"]["v1"])
    assert registry.push("support", tiny["adapters"]["v1"]).digest == first.digest and len(registry.blobs.digests()) == 1
    folder = registry.blob_folder(first)  # a verified local copy, for the loader
    assert folder.is_relative_to(tmp_path / "cache") and read_adapter(folder).config.r == 8
    pulled = registry.pull("support@1", tmp_path / "pulled")
    assert (pulled / "adapter_model.safetensors").read_bytes() == (
        tiny["adapters"]["v1"] / "adapter_model.safetensors").read_bytes()
    fsspec.filesystem("memory").pipe(f"{registry.blobs.url(first.digest)}/adapter_model.safetensors", b"tampered")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "fresh-cache"))  # another machine, nothing cached
    with pytest.raises(BlobIntegrityError, match="does not match its digest"):
        Registry(f"sqlite:///{tmp_path / 'registry.db'}", store).pull("support@1", tmp_path / "again")
    assert not (tmp_path / "fresh-cache" / "blob-cache" / first.digest).exists()  # the bad copy is not kept
