"""``python -m train.pipeline``: data -> stages -> evaluation, resumable, on a time budget (tiny, on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.pipeline import load_pipeline, run_pipeline

SMALL = ["data.height=16", "data.width=16", "autoencoder.patch_size=4", "model.hidden=64", "model.heads=4",
         "data.batch_size=2", "logger.log_every=1"]


def _yaml(tmp_path: Path) -> Path:
    stage_over = "\n".join(f"      - {o}" for o in SMALL)
    text = f"""
name: tiny
out: {tmp_path / 'out'}
data: {{clips: 3, frames: 29, size: 16, stride: 1, supersample: 2, heldout_clips: 2, heldout_frames: 29}}
stages:
  - name: pretrain
    experiment: demo
    overrides:
      - trainer.steps=3
{stage_over}
  - name: midtrain
    experiment: demo_midtrain
    init: pretrain
    minutes: 0.02
    probe_steps: 4
    min_steps: 3
    overrides:
      - stage.curriculum=[[0,24]]
{stage_over}
eval: {{num: 2, protocols: 'short,control', short_latents: 8, control_latents: 8, minutes: 0.1,
        variants: ['nomem'], variant_stages: [midtrain], denoising_clips: 1}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_pipeline_stops_on_its_budget_resumes_and_reports(tmp_path, monkeypatch):
    path = _yaml(tmp_path)
    out = tmp_path / "out"
    # A budget too small for anything: it stops cleanly with 75 and leaves a resumable state.
    assert run_pipeline(load_pipeline(str(path), ["stop_after=0.01"]), log=lambda *_: None) == 75
    assert (out / "pipeline.json").exists() and (out / "report.md").exists()
    # The same command again finishes everything.
    assert run_pipeline(load_pipeline(str(path), [f"export={tmp_path / 'export'}"]), log=lambda *_: None) == 0
    state = json.loads((out / "pipeline.json").read_text())
    assert state["stages"]["pretrain"]["done"] and state["stages"]["pretrain"]["step"] == 3
    mid = state["stages"]["midtrain"]
    assert mid["done"] and mid["step"] == mid["steps"] >= 3 and mid["probe_it_per_s"] > 0  # timed by its probe
    assert state["data"]["train"]["frames_per_s"] > 0 and state["eval"]["done"]
    report = (out / "report.md").read_text()
    for row in ("| pretrain |", "| midtrain |", "| midtrain+nomem |", "control dB"):
        assert row in report, row
    assert "| pretrain+nomem |" not in report  # variants only for the stages named
    assert "## Training curves" in report and (out / "plots" / "midtrain_loss.png").is_file()
    assert "## Where frames lose the scene" in report and "### Denoising diagnostic: midtrain" in report
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == ["denoising.json", "eval_report.json", "pipeline.json", "report.md", "report.tar.gz"]
    # A third run does nothing again: every phase is recorded as done.
    before = (out / "pretrain" / "metrics.jsonl").stat().st_mtime_ns
    assert run_pipeline(load_pipeline(str(path)), log=lambda *_: None) == 0
    assert (out / "pretrain" / "metrics.jsonl").stat().st_mtime_ns == before
    # Other evaluation rows (e.g. a pipeline extending this one): training is kept, the evaluation runs again.
    assert run_pipeline(load_pipeline(str(path), ["eval.variants=[]", "eval.protocols=short"]), log=lambda *_: None) == 0
    assert (out / "pretrain" / "metrics.jsonl").stat().st_mtime_ns == before
    report = (out / "report.md").read_text()
    assert "| midtrain |" in report and "| midtrain+nomem |" not in report
    # An evaluation cut off by the time budget: the report shows the rows it finished, marked as such.
    import eval.__main__ as evaluation
    from train.pipeline import Stop

    def cut_off(*args, **kwargs):
        (out / "eval" / "report.md").write_text("# Evaluation\n| pretrain | finished row |\n")
        raise Stop("time budget spent")

    monkeypatch.setattr(evaluation, "evaluate_bundles", cut_off)
    assert run_pipeline(load_pipeline(str(path), ["eval.protocols=control"]), log=lambda *_: None) == 75
    report = (out / "report.md").read_text()
    assert "cut off by the time budget" in report and "| pretrain | finished row |" in report


def test_bad_pipelines_fail_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="no pipeline 'nope'"):
        load_pipeline("nope")
    path = _yaml(tmp_path)
    with pytest.raises(SystemExit, match="stagez"):
        load_pipeline(str(path), ["stagez=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{name: b, experiment: demo, init: a}]\n")
    with pytest.raises(SystemExit, match="not an earlier stage"):
        load_pipeline(str(bad))
    assert load_pipeline("gpu_small").stages[1].init == "pretrain"  # the shipped pipelines load
    assert load_pipeline("demo").eval.num >= 8
    # The GPU ablation's stages differ in one model choice each, and their overrides compose.
    from train.pipeline import compose_experiment

    ablate = {s.name: compose_experiment(s.experiment, s.overrides).model for s in load_pipeline("gpu_ablate").stages}
    assert ablate["x0"].image_warp == "off" and ablate["warp"].image_warp == ablate["warp_mid"].image_warp == "patch"


def test_a_pipeline_extends_another_by_appending_stages(tmp_path):
    full = load_pipeline("gpu_small_full")
    base = load_pipeline("gpu_small")
    assert [s.name for s in full.stages] == [s.name for s in base.stages] + ["rl", "teacher", "ode_init", "distill"]
    assert full.stages[0] == base.stages[0] and full.data == base.data  # inherited unchanged
    assert full.name == "gpu_small_full" and full.eval.stages == ["pretrain", "midtrain", "rl", "distill"]
    assert full.eval.variants == base.eval.variants  # keys the extending file leaves out come from the base
    child = tmp_path / "child.yaml"
    child.write_text("extends: nope\nname: c\n")
    with pytest.raises(SystemExit, match="extends: 'nope'"):
        load_pipeline(str(child))
