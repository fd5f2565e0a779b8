"""Run a training experiment for a fixed wall-clock budget and report its throughput and memory.

    python -m benchmarks.train_run experiment=synthetic_small data.path=DIR [overrides] --minutes 3

Runs the real entry point in-process (Hydra compose -> train.run), so it measures what users run:
data loading, the stage, the trainer's loop. Reports steps/s and tokens/s (median over the logged
intervals after the first, from metrics.jsonl), peak GPU memory, the loss curve and the run
directory (sample videos under samples/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.schema import register_configs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=synthetic_small")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget; sets trainer.steps from a short probe")
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--out", default="outputs/bench_train")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    register_configs()
    from train.run import run

    def cfg_with(*extra: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            return compose("config", overrides=[*a.overrides, "logger.progress_bar=false", *extra])

    # Probe: a few steps to time one step (includes warm-up), then size the real run to the budget.
    t0 = time.time()
    run(cfg_with(f"trainer.steps={a.probe_steps}", "trainer.sample_every=0", "trainer.export=false", "checkpoint.every=0", "checkpoint.save_final=false"), Path(a.out) / "probe")
    per_step = (time.time() - t0) / a.probe_steps
    steps = max(a.probe_steps, int(a.minutes * 60 / per_step))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = Path(a.out) / "run"
    t0 = time.time()
    run(cfg_with(f"trainer.steps={steps}", f"trainer.sample_every={steps}", "checkpoint.every=0"), run_dir)
    wall = time.time() - t0
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    perf = [r for r in rows if "perf/it_per_s" in r][1:] or [r for r in rows if "perf/it_per_s" in r]
    result = {
        "overrides": a.overrides,
        "steps": steps,
        "wall_s": round(wall, 1),
        "it_per_s": statistics.median(r["perf/it_per_s"] for r in perf),
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in perf),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "loss_first": next(r["loss"] for r in rows if "loss" in r),
        "loss_last": [r["loss"] for r in rows if "loss" in r][-1],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
