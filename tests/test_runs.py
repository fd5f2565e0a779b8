"""``python -m train`` as a user runs it: run names, resume by the README's command, sweep summaries,
and config checks that fail before any directory is created (issue 15, items 1, 5, 8, 9)."""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# the demo experiment shrunk to a fraction of a second per step
SMALL = ["data.height=16", "data.width=16", "autoencoder.patch_size=4", "model.hidden=64", "model.heads=4",
         "data.batch_size=2", "logger.progress_bar=false", "logger.log_every=1"]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # tiny shapes: one thread is fastest on a shared CPU


def _train(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = ENV
    return subprocess.run([PY, "-m", "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_run_directories_have_short_safe_names_that_identify_the_overrides():
    from configs.schema import compose_checked
    from train.runs import run_id, run_name

    overrides = ["experiment=demo", "data.path=outputs/data/mine", "init=/tmp/x/pretrain/export/bundle",
                 "optim.lr=3e-4", "data.mixture=[{path: a, weight: 0.5}, {path: b, weight: 0.5}]", "checkpoint.resume=latest"]
    cfg, _ = compose_checked(overrides, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    assert run_dir.parent == Path("outputs/demo")  # one level per run, not one per '/' of a path override
    assert re.fullmatch(r"\d{8}-\d{6}_path-mine_init-bundle_lr-3e-4_mixture_[0-9a-f]{8}", run_dir.name), run_dir.name
    # the name can be given back to Hydra as a value (today's '=' and ',' broke hydra.run.dir=<old dir>)
    parsed = OverridesParser.create().parse_overrides([f"hydra.run.dir={run_dir}"])
    assert parsed[0].value() == str(run_dir)
    exclude = ["experiment", "checkpoint.resume"]
    assert run_id(overrides, exclude) == run_id(list(reversed(overrides[:-1])), exclude)  # order and resume do not matter
    assert run_id(overrides, exclude) != run_id([*overrides, "optim.lr=1e-4"], exclude)
    assert run_name([], exclude) == run_id([], exclude)


def test_resume_latest_continues_the_interrupted_run_the_readme_way(two_clips, tmp_path, monkeypatch, capsys):
    """`python -m train <command>` interrupted, then `<command> checkpoint.resume=latest`: the same run continues."""
    command = ["experiment=demo", f"data.path={two_clips}", *SMALL, "trainer.steps=6", "checkpoint.every=2", "trainer.export=false"]
    env = ENV
    proc = subprocess.Popen([PY, "-m", "train", *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "outputs" / "demo"
    end = time.monotonic() + 180
    while not list(runs.glob("*/ckpt/step_000002/COMPLETE")):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends before a time limit: checkpoint and exit 75
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    (run_dir,) = list(runs.iterdir())
    stopped = json.loads((run_dir / "status.json").read_text())["step"]
    assert 2 <= stopped < 6, f"the run was not interrupted (step {stopped})"

    done = _train(tmp_path, *command, "checkpoint.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(runs.iterdir()) == [run_dir]  # no new directory: the interrupted run continued
    assert f"resumed from {run_dir.resolve()}/ckpt/step_{stopped:06d} at step {stopped}" in done.stdout + done.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert _steps(run_dir) == list(range(1, 7))  # every step once, across both attempts
    info = json.loads((run_dir / "run.json").read_text())
    assert info["overrides"][-1] == "checkpoint.resume=latest" and (run_dir / "config.yaml").read_text().startswith("# python -m train ")

    # another command has no earlier run: an error naming where it looked, and nothing created
    _cli(monkeypatch, tmp_path, *command, "optim.lr=1e-4", "checkpoint.resume=latest")
    err = capsys.readouterr().err
    assert "no earlier run" in err and str(runs.resolve()) in err, err
    assert list(runs.iterdir()) == [run_dir]


def test_sweep_points_are_named_by_their_swept_values_and_summarised(two_clips, tmp_path):
    sweep = tmp_path / "sweep"
    done = _train(tmp_path, "-m", "experiment=demo", f"data.path={two_clips}", *SMALL, "trainer.steps=2", "trainer.sample_every=2",
                  "stage.sample_latents=4", "stage.sample_steps=1", "trainer.export=false", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_lr-0.001", "1_lr-0.002"]
    table = (sweep / "summary.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert rows[0].split(" | ")[:5] == ["| run", "overrides", "status", "step", "loss"] and "psnr" in rows[0]
    assert rows[1].startswith("| 0_lr-0.001 | optim.lr=0.001 | completed | 2 | ") and rows[2].startswith("| 1_lr-0.002 | optim.lr=0.002 |")
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["metrics"]["sample/psnr"] > 0 for r in records] == [True, True]
    assert f"data.path={two_clips}" in records[0]["overrides"]  # the full overrides, in one place


def _cli(monkeypatch, tmp_path, *argv: str) -> str:
    """``python -m train ARGV`` in this process (the failing paths stop before Hydra starts); its stderr."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("train", run_name="__main__")
    assert e.value.code == 2
    return e.value


def test_bad_commands_fail_before_any_directory_exists(monkeypatch, tmp_path, capsys):
    _cli(monkeypatch, tmp_path, "--cfg", "job", "experiment=demo", "+optim.lrr=1")  # printing the config checks it too
    err = capsys.readouterr().err
    assert "config key 'optim.lrr' is not in OptimConfig" in err and "did you mean 'optim.lr'" in err
    _cli(monkeypatch, tmp_path, "experiment=demo", "optim.lrr=1")
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "+optim" not in err  # Hydra's "use +optim.lrr=1" hint would not work either
    _cli(monkeypatch, tmp_path, "experiment=demo", "trainer.steps=0")
    assert "trainer.steps: must be >= 1" in capsys.readouterr().err
    # experiment=demo on a fresh clone: say how to make the data
    _cli(monkeypatch, tmp_path, "experiment=demo")
    err = capsys.readouterr().err
    assert "data.path=outputs/demo/data" in err and "make demo" in err and "python -m data.synthetic --out outputs/demo/data" in err
    assert not (tmp_path / "outputs").exists()


def test_a_run_whose_config_fails_its_checks_records_it(tmp_path):
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register_configs
    from train.run import run

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=["experiment=demo", "schedule.min_lr_ratio=2"])
    with pytest.raises(ValueError, match="schedule.min_lr_ratio"):
        run(cfg, tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "schedule.min_lr_ratio" in status["error"]
