"""Checkpoints: atomic writes, completion markers, latest resolution, pruning, errors, SIGTERM preemption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_worker import RegressionConfig, make_trainer, read_losses
from train.checkpoint import LATEST, MARKER, CheckpointError, list_checkpoints, prune, read_marker, resolve_resume
from train.logging import truncate_jsonl
from train.signals import PREEMPTED_EXIT_CODE

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir())


def test_periodic_checkpoints_keep_last_n(tmp_path):
    make_trainer(tmp_path, steps=7, every=2, keep_last=2).fit()
    ckpt = tmp_path / "ckpt"
    # Steps 2, 4, 6 periodic + 7 final; the oldest two pruned.
    assert _names(ckpt) == [LATEST, "step_000006", "step_000007"]
    assert (ckpt / LATEST).read_text() == "step_000007"
    marker = read_marker(ckpt / "step_000007")
    assert marker["step"] == 7 and marker["world_size"] == 1 and marker["format"] == "dcp"
    assert {p.name for p in (ckpt / "step_000007").iterdir()} == {MARKER, "dcp", "trainer.pt", "rank_00000.pt"}


def test_incomplete_checkpoints_are_ignored(tmp_path):
    make_trainer(tmp_path, steps=4, every=2).fit()
    ckpt = tmp_path / "ckpt"
    # A crash after the rename but before the marker (cannot happen with the protocol, but a
    # copied/half-synced directory can look like this), and one mid-write.
    shutil.copytree(ckpt / "step_000004", ckpt / "step_000006")
    (ckpt / "step_000006" / MARKER).unlink()
    shutil.copytree(ckpt / "step_000004", ckpt / "step_000008.tmp")
    (ckpt / LATEST).write_text("step_000006")  # even a pointer to it is not trusted
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert resolve_resume(ckpt, "latest") == ckpt / "step_000004"
    assert [s for s, _ in list_checkpoints(ckpt)] == [2, 4]
    with pytest.raises(CheckpointError, match=r"step_000006: not a complete checkpoint"):
        resolve_resume(ckpt, str(ckpt / "step_000006"))
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(ckpt, str(ckpt / "step_999999"))
    (ckpt / "step_000002" / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt completion marker"):
        read_marker(ckpt / "step_000002")

    # Resuming with resume=latest continues from step 4; its step-6 checkpoint replaces the invalid one.
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        make_trainer(tmp_path, steps=6, every=2, resume="latest").fit()
    assert (ckpt / LATEST).read_text() == "step_000006"
    assert read_marker(ckpt / "step_000006")["step"] == 6
    assert (ckpt / "step_000008.tmp").is_dir()  # newer than any complete checkpoint: not pruned
    removed = prune(ckpt, keep_last=1)
    assert ckpt / "step_000004" in removed and (ckpt / "step_000006").is_dir()
    assert resolve_resume(tmp_path / "nothing_here", "latest") is None
    assert resolve_resume(ckpt, None) is None


def test_prune_never_deletes_the_latest(tmp_path):
    make_trainer(tmp_path, steps=6, every=2).fit()
    ckpt = tmp_path / "ckpt"
    (ckpt / LATEST).write_text("step_000002")  # e.g. someone resumed from an older checkpoint
    prune(ckpt, keep_last=1)
    assert [s for s, _ in list_checkpoints(ckpt)] == [2, 6]


def test_resume_into_a_different_model_names_the_key(tmp_path):
    make_trainer(tmp_path, steps=2, every=2).fit()
    wider = make_trainer(tmp_path, steps=4, stage_cfg=RegressionConfig(hidden=24), resume="latest")
    with pytest.raises(CheckpointError, match=r"step_000002/dcp: cannot load.*Size mismatch.*student\.embed\.weight"):
        wider.fit()


def test_resume_from_explicit_path_and_jsonl_truncation(tmp_path):
    make_trainer(tmp_path, steps=6, every=2).fit()
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    # Resume from step 2 (e.g. after a divergence): records past it are dropped, then recomputed.
    make_trainer(tmp_path, steps=6, resume=str(tmp_path / "ckpt" / "step_000002")).fit()
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def _run_worker(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", "12", "--aug-std", "0.05", "--optim", "muon", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_and_the_resumed_run_matches(tmp_path):
    reference = tmp_path / "reference"
    straight = _run_worker(reference, "--dump", str(tmp_path / "reference.pt"))  # runs alongside
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    proc = _run_worker(run, "--sleep", "0.3", "--ready-file", f"{ready}:3")
    deadline = time.time() + 90
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "worker never reached step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGTERM"
    stopped_at = status["step"]
    assert 3 <= stopped_at < 12
    assert read_marker(run / "ckpt" / f"step_{stopped_at:06d}")["step"] == stopped_at
    assert (run / "ckpt" / LATEST).read_text() == f"step_{stopped_at:06d}"
    out, _ = straight.communicate(timeout=120)
    assert straight.returncode == 0, out

    resumed = _run_worker(run, "--resume", "latest", "--dump", str(tmp_path / "resumed.pt"))
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    a, b = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "resumed.pt")
    assert a.keys() == b.keys() == {"student", "student_ema"}
    assert all(torch.equal(a[r][k], b[r][k]) for r in a for k in a[r])
    assert read_losses(reference) == read_losses(run)
