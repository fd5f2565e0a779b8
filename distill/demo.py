"""The distillation part of ``make demo``: teacher -> ODE init -> Context Forcing, on the demo's data.

    from distill.demo import run_distillation
    report = run_distillation(out=Path("outputs/demo"), data=Path("outputs/demo/data"),
                              parent=Path("outputs/demo/midtrain/export/bundle"))

Three ordinary runs through ``train.run.run`` (Hydra-composed from ``configs/experiment/demo_teacher.yaml``,
``demo_ode_init.yaml``, ``demo_distill.yaml``), each resuming when its directory holds a checkpoint:

1. ``<out>/teacher``: the mid-trained AR model fine-tuned bidirectionally with union memory (the real score);
2. ``<out>/ode_init``: the 4-step student initialised on the AR model's own ODE trajectories;
3. ``<out>/distill``: Context Forcing of that student against the teacher; its ``export/bundle`` is the
   4-step bundle ``python -m infer`` and the player run.

``ablations`` adds runs of the last stage with other ``stage.teacher_context`` values
(``<out>/distill_<name>``), e.g. ``("none",)`` for the memory-less Self-Forcing baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["run_distillation", "run_experiment"]


def _losses(run_dir: Path) -> tuple[float | None, float | None]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    vals = [float(r["loss"]) for r in rows if "loss" in r]
    return (vals[0], vals[-1]) if vals else (None, None)


def run_experiment(experiment: str, run_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose ``experiment=<experiment>`` with overrides, train it in ``run_dir`` (resuming), summarise it."""
    from train.pipeline import compose_experiment
    from train.run import run

    cfg = compose_experiment(experiment, ["checkpoint.resume=latest", "logger.progress_bar=false", "logger.wandb=false", *overrides])
    t0 = time.time()
    result = run(cfg, run_dir)
    first, last = _losses(run_dir)
    return {"run_dir": str(run_dir), "bundle": str(run_dir / "export" / "bundle"), "steps": result.step,
            "loss_start": first, "loss_end": last, "seconds": round(time.time() - t0, 1)}


def run_distillation(out: Path, data: Path, parent: Path, *, overrides: Sequence[str] = (), ablations: Sequence[str] = (),
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Teacher, ODE init and distillation of the demo model whose AR bundle is ``parent``; see the module docstring.

    Returns {"teacher", "ode_init", "distill", "distill_<ablation>"...: {run_dir, bundle, steps, loss_start,
    loss_end, seconds}, "seconds": total}. ``overrides`` go to every run (e.g. ``trainer.steps=...``).
    """
    out, data, parent = Path(out).resolve(), Path(data).resolve(), Path(parent).resolve()
    common = [f"data.path={data}", *overrides]
    t0 = time.time()
    report: dict[str, Any] = {}
    log("[demo] distillation 1/3: bidirectional memory teacher (stage=midtrain stage.mode=bidirectional)")
    report["teacher"] = run_experiment("demo_teacher", out / "teacher", [*common, f"init={parent}"])
    log("[demo] distillation 2/3: ODE initialisation of the 4-step student from the AR model's own trajectories")
    report["ode_init"] = run_experiment("demo_ode_init", out / "ode_init", [*common, f"init={parent}"])
    log("[demo] distillation 3/3: Context Forcing (DMD against the teacher with the student's aligned memory)")
    student = [*common, f"init={report['ode_init']['bundle']}", f"stage.teacher={report['teacher']['bundle']}"]
    report["distill"] = run_experiment("demo_distill", out / "distill", student)
    for name in ablations:
        log(f"[demo] distillation ablation: stage.teacher_context={name}")
        report[f"distill_{name}"] = run_experiment("demo_distill", out / f"distill_{name}", [*student, f"stage.teacher_context={name}"])
    report["seconds"] = round(time.time() - t0, 1)
    return report
