"""Registry defects found by trying it as a new user (issue 30), each pinned by a test that failed before
the fix: gc racing pushes, no-op promotions breaking rollback, reused version numbers, promotions every
server would refuse, delete racing promote, retrain over an existing run, a new database opened by many
processes at once, long names, pull into a file, and the modes of the files we write."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from registry_fixtures import backend, postgres, tiny  # noqa: F401 - fixtures
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import BlobIntegrityError, RegistryError
from lorakit.registry import Registry


def _distinct(source: Path, folder: Path, i: int) -> Path:
    """A copy of an adapter folder with other content (a notes file), so it gets its own blob."""
    shutil.copytree(source, folder)
    (folder / "NOTES.md").write_text(f"copy {i}\n")
    return folder


def _tamper(registry: Registry, digest: str) -> None:
    weights = Path(registry.blobs.url(digest)) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))


# -- 1: gc never removes the blob of a push in flight ------------------------------------------------------
def test_gc_between_a_pushs_blob_and_its_row_keeps_the_blob(backend, tiny):
    url, blobs = backend
    registry, collector = Registry(url, blobs), Registry(url, blobs)
    put = registry.blobs.put

    grace = [3600.0]

    def put_then_gc(*args, **kwargs):
        stored = put(*args, **kwargs)
        collector.gc(grace=grace[0])  # exactly in the window: the blob is written, its version not yet recorded
        return stored

    registry.blobs.put = put_then_gc
    info = registry.push("support", tiny["adapters"]["v1"])
    registry.blob_folder(info)  # still there, and it verifies
    grace[0] = 0.0  # a gc told the push is stale takes the blob: the push then fails loudly, records nothing
    with pytest.raises(RegistryError, match="push it again"):
        registry.push("support", tiny["adapters"]["v2"])
    assert [v.version for v in registry.versions("support")] == [1]


def test_gc_that_dooms_a_blob_a_push_claims_meanwhile_puts_it_back(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    first = registry.push("support", tiny["adapters"]["v1"])
    registry.push("support", tiny["adapters"]["v2"], alias="prod")
    registry.delete(first.ref)  # v1's blob is now unreferenced: gc's to take ...
    pusher = Registry(url, blobs)
    doom = registry.blobs.doom
    pushed = []

    def doom_then_push(digest):
        doomed = doom(digest)
        pushed.append(pusher.push("support", tiny["adapters"]["v1"]))  # ... but a push of the same bytes comes in
        return doomed

    registry.blobs.doom = doom_then_push
    assert registry.gc()["removed_blobs"] == []
    pusher.blob_folder(pushed[0])  # its blob is back in place and verifies


GC_LOOP = textwrap.dedent("""
    import sys, time
    from lorakit.registry import Registry
    registry = Registry(sys.argv[1], sys.argv[2], actor="gc")
    deadline = time.monotonic() + float(sys.argv[3])
    runs = 0
    while time.monotonic() < deadline:
        registry.gc()
        runs += 1
    print(runs, flush=True)
""")


def test_pushes_while_gc_loops_all_keep_their_files(tiny, tmp_path):
    url, blobs = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "blobs"
    registry = Registry(url, blobs)
    folders = [_distinct(tiny["adapters"]["v1"], tmp_path / f"a{i}", i) for i in range(30)]
    loop = subprocess.Popen([sys.executable, "-c", GC_LOOP, url, str(blobs), "600"], stdout=subprocess.PIPE,
                            text=True)
    try:
        for folder in folders:
            registry.push("support", folder)
    finally:
        loop.kill()
        loop.wait(timeout=30)
    missing = []
    for version in registry.versions("support"):
        try:
            registry.blob_folder(version)
        except BlobIntegrityError:
            missing.append(version.ref)
    assert len(registry.versions("support")) == 30 and not missing, f"blobs gone: {missing}"


# -- 2, 3: history that rollback and servers can trust ------------------------------------------------------
def test_promoting_to_the_version_an_alias_holds_changes_nothing_and_rollback_still_moves_back(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    registry.push("svc", tiny["adapters"]["v2"])
    assert registry.promote("svc@2", "prod")["changed"] is True
    again = registry.promote("svc@2", "prod")
    assert again["changed"] is False and again["previous"] == 2
    assert [e["action"] for e in registry.log("svc")] == ["push", "alias", "push", "promote"]
    assert registry.rollback("svc", "prod") == {"from": 2, "to": 1}


def test_version_numbers_are_never_reused_after_deleting_the_newest(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    registry.push("svc", tiny["adapters"]["v2"])
    registry.delete("svc@2")
    third = registry.push("svc", tiny["adapters"]["v3"])
    assert third.version == 3  # svc@2 meant other weights once: nobody may get a different svc@2


# -- 5, 6: promotions that would be refused later are refused now ---------------------------------------------
def test_promote_with_an_eval_and_no_gates_refuses_a_worse_candidate(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    good = registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    registry.push("svc", tiny["adapters"]["v2"])
    scores = {good.digest: {"exact_match": 1.0, "loss": 0.2}}

    def evaluate(info, folder: Path) -> dict:
        return scores.get(info.digest, {"exact_match": 0.0, "loss": 3.0})

    with pytest.raises(RegistryError, match="scores below svc@1.*exact_match"):
        registry.promote("svc@2", "prod", data=Path("held_out.jsonl"), evaluate=evaluate)
    assert registry.aliases("svc") == {"prod": 1}
    registry.promote("svc@2", "prod", data=Path("held_out.jsonl"), evaluate=evaluate, allow_regression=True)
    assert registry.aliases("svc") == {"prod": 2}


def test_promote_refuses_a_tampered_blob_and_another_base_unless_told(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    tampered = registry.push("svc", tiny["adapters"]["v2"])
    _tamper(registry, tampered.digest)
    with pytest.raises(BlobIntegrityError, match="does not match its digest"):
        registry.promote(tampered.ref, "prod")
    other = registry.push("svc", tiny["adapters"]["other_base"])
    with pytest.raises(RegistryError, match="another base.*--new-base"):
        registry.promote(other.ref, "prod")
    assert registry.aliases("svc") == {"prod": 1}
    assert registry.promote(other.ref, "prod", new_base=True)["changed"]


def test_gated_promote_across_a_base_update_evaluates_each_version_on_its_own_base(tiny, tmp_path, monkeypatch):
    from lorakit.train import job, promote

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    held = registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    candidate = registry.push("svc", tiny["adapters"]["other_base"])
    assert held.base_model != candidate.base_model  # as training recorded them
    evaluated_on = {}

    def fake_eval(model, folder, data, settings=None):
        evaluated_on[Path(folder).name] = model
        return {"adapter": {"exact_match": 1.0, "loss": 0.1}}

    monkeypatch.setattr(job, "run_eval", fake_eval)
    promote.gated_promote(registry, candidate.ref, "prod", [], tmp_path / "eval.jsonl", new_base=True)
    assert evaluated_on == {candidate.digest: candidate.base_model, held.digest: held.base_model}


# -- 7: delete and promote cannot interleave -----------------------------------------------------------------
def test_delete_rechecks_aliases_inside_its_transaction(backend, tiny):
    url, blobs = backend
    registry, other = Registry(url, blobs), Registry(url, blobs)
    registry.push("svc", tiny["adapters"]["v1"], alias="prod")
    registry.push("svc", tiny["adapters"]["v2"])
    resolve = registry.resolve

    def resolve_then_a_promote_lands(ref, default_alias=None):
        info = resolve(ref, default_alias)
        other.promote("svc@2", "prod")  # another operator, between delete's first look and its change
        return info

    registry.resolve = resolve_then_a_promote_lands
    with pytest.raises(RegistryError, match="svc:prod points to"):
        registry.delete("svc@2")
    assert other.resolve("svc:prod").version == 2  # prod points at a version that exists


# -- 8: retrain never overwrites a run ----------------------------------------------------------------------
def test_retrain_refuses_an_existing_output_dir_and_never_touches_a_registered_run(tiny, tmp_path):
    from lorakit.train.promote import retrain

    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    source = tmp_path / "runs" / "svc"
    source.mkdir(parents=True)
    (source / "summary.json").write_text("{}")
    registry.push("svc", tiny["adapters"]["v1"], source_run=str(source), train_config="model: x\n")
    with pytest.raises(RegistryError, match="training run of svc@1"):
        retrain(registry, "svc@1", str(tiny["other"]), output_dir=source, overwrite=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="--overwrite"):
        retrain(registry, "svc@1", str(tiny["other"]), output_dir=busy)
    assert (busy / "keep.txt").read_text() == "mine" and (source / "summary.json").read_text() == "{}"


# -- 9: opening, naming, pulling, file modes ----------------------------------------------------------------------
def test_a_new_sqlite_registry_opened_by_many_at_once(tmp_path):
    url, blobs = f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path / "blobs"
    start, errors = threading.Barrier(16), []

    def open_it():
        start.wait()
        try:
            Registry(url, blobs).names()
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(error))

    threads = [threading.Thread(target=open_it) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_long_names_and_aliases_are_refused_with_a_message(backend, tiny):
    url, blobs = backend
    registry = Registry(url, blobs)
    with pytest.raises(RegistryError, match="the limit is 100"):
        registry.push("x" * 300, tiny["adapters"]["v1"])
    registry.push("svc", tiny["adapters"]["v1"])
    with pytest.raises(RegistryError, match="the limit is 100"):
        registry.promote("svc@1", "a" * 150)
    with pytest.raises(RegistryError, match="out of range"):
        registry.resolve("svc@99999999999999999999")


def test_pull_into_a_file_is_refused_and_written_files_have_the_umasks_mode(tiny, tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    registry.push("svc", tiny["adapters"]["v1"])
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    with pytest.raises(RegistryError, match="is a file"):
        registry.pull("svc@1", target)
    result = CliRunner().invoke(app, ["registry", "pull", "svc@1", str(target), "--registry", str(tmp_path / "reg")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    pulled = registry.pull("svc@1", tmp_path / "pulled")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert mode(pulled) == 0o777 & ~umask
    assert {mode(f) for f in pulled.iterdir()} == {0o666 & ~umask}
    assert mode(tiny["adapters"]["v1"] / "adapter_model.safetensors") == 0o666 & ~umask  # save_pretrained's
