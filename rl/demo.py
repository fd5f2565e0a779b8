"""The RL step of ``make demo``: train ``experiment=demo_rl`` on a bundle and report every reward before and after.

    from rl.demo import run_demo_rl
    report = run_demo_rl(out / "rl", bundle=midtrain_bundle, data=out / "data")
    print("\\n".join(report["lines"]))

or ``python -m rl.demo --bundle B --data D --out O [override ...]``. Rewards are measured by
``rl.evaluate.evaluate_bundle`` on the run's fixed evaluation paths (same paths, same noise) for the
parent bundle and for the exported RL bundle. Re-running resumes: a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["run_demo_rl", "main"]


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def run_demo_rl(run_dir: str | Path, bundle: str | Path, data: Optional[str | Path] = None,
                overrides: Sequence[str] = (), experiment: str = "demo_rl", device: Optional[str] = None) -> dict[str, Any]:
    """Train ``experiment`` from ``bundle`` in ``run_dir`` (resuming) and measure its rewards before and after.

    The GPU pipeline calls it with ``experiment="gpu_small_rl"``; ``device`` is where the rewards are
    measured (default: cuda when available).

    Returns {"run_dir", "bundle", "steps", "seconds", "train_seconds", "eval_seconds", "loss_start", "loss_end",
    "rewards": {score: {"before", "after", "weight"}}, "time_split": {phase: mean seconds per step}, "lines"}.
    """
    import torch
    from omegaconf import OmegaConf

    from rl.evaluate import evaluate_bundle
    from train.run import run

    run_dir = Path(run_dir)
    extra = [f"init={Path(bundle).resolve()}", "checkpoint.resume=latest", "logger.progress_bar=false"]
    if data is not None:
        extra.append(f"data.path={data}")
    from train.pipeline import compose_experiment

    cfg = compose_experiment(experiment, [*extra, *overrides])
    obj = OmegaConf.to_object(cfg)
    data_dir = obj.stage.paths.data or obj.data.path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    before = evaluate_bundle(bundle, obj.stage, data_dir, device)
    t1 = time.time()
    result = run(cfg, run_dir)
    t2 = time.time()
    out_bundle = run_dir / "export" / "bundle"
    after = evaluate_bundle(out_bundle, obj.stage, data_dir, device)
    t3 = time.time()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    phases = ("plan", "prefix", "candidates", "decode", "reward", "update")
    split = {p: sum(r[f"time/{p}"] for r in rows if f"time/{p}" in r) / max(1, sum(1 for r in rows if f"time/{p}" in r)) for p in phases}
    weights = obj.stage.trained_weights
    rewards = {k: {"before": before.get(k), "after": after.get(k), "weight": weights.get(k, 0.0)} for k in sorted(set(before) | set(after))}
    report = {
        "run_dir": str(run_dir), "bundle": str(out_bundle), "steps": result.step, "seconds": round(t3 - t0, 1),
        "train_seconds": round(t2 - t1, 1), "eval_seconds": round((t1 - t0) + (t3 - t2), 1),
        "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None,
        "rewards": rewards, "time_split": split,
    }
    lines = [f"  rl         {result.step} steps in {report['train_seconds']}s (+{report['eval_seconds']}s reward evaluation); bundle {out_bundle}"]
    for k, v in rewards.items():
        lines.append(f"    reward {k:<14} {_fmt(v['before'])} -> {_fmt(v['after'])}  (weight {v['weight']:g}; before -> after on fixed paths)")
    lines.append("    step time split (s): " + ", ".join(f"{p} {split[p]:.3f}" for p in phases))
    report["lines"] = lines
    (run_dir / "rl_report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="the bundle to start from (the demo's mid-train bundle)")
    p.add_argument("--data", default=None, help="dataset of start clips (default: the experiment's data.path)")
    p.add_argument("--out", default="outputs/demo/rl", help="run directory")
    p.add_argument("--experiment", default="demo_rl")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.steps=10")
    a = p.parse_args(argv)
    report = run_demo_rl(a.out, a.bundle, a.data, a.overrides, a.experiment)
    print("\n".join(report["lines"]))
    return report


if __name__ == "__main__":
    main()
