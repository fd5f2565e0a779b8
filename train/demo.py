"""``make demo``: the whole pipeline on the embedded default, on a CPU, in a few minutes.

synthetic world -> pretrain (tiny block-causal model) -> mid-train with memory -> evaluation of both
bundles on held-out clips (short, long revisits with memory on and off, control) -> a video rendered
from the mid-trained bundle by the inference module.

Data, stages and evaluation are the ``demo`` pipeline (``configs/pipeline/demo.yaml``, run by
``train.pipeline``: the same code as the GPU pipelines); the walk is ``python -m infer``. Re-running
resumes: finished phases are not run again.

    python -m train.demo [out=DIR] [pretrain_steps=N] [midtrain_steps=N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from train.pipeline import load_pipeline, run_pipeline

_KEYS = ("out", "pretrain_steps", "midtrain_steps")


def _args(argv: list[str]) -> dict[str, str]:
    out = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in _KEYS:
            raise SystemExit(f"train.demo: arguments are KEY=VALUE with KEY one of {list(_KEYS)}, got {a!r}")
        out[k] = v
    return out


def first_frame_png(data: Path, out: Path) -> Path:
    """The first frame of the dataset's first clip as a PNG (the conditioning image)."""
    import cv2

    from data.indexed import ShardDataset

    frame = ShardDataset(data)[0]["video"][0]
    path = out / "first_frame.png"
    cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return path


def render_video(bundle: Path, data: Path, out: Path, pose: str = "w-3, right-4, w-4, left-4, s-4, d-4") -> dict[str, Any]:
    """Run the inference CLI on the bundle: walk out, turn, come back; returns the sidecar's timings."""
    video = out / "walk.mp4"
    cmd = [sys.executable, "-m", "infer", "--bundle", str(bundle), "--image", str(first_frame_png(data, out)),
           "--pose", pose, "--out", str(video), "--seed", "0"]
    subprocess.run(cmd, check=True)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    return {"video": str(video), "sidecar": str(video.with_suffix(".json")), "command": " ".join(cmd[1:]),
            "timings": sidecar.get("timings", {})}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(sys.argv[1:] if argv is None else argv)
    t_all = time.time()
    cfg = load_pipeline("demo", [f"out={Path(a.get('out', 'outputs/demo')).resolve()}"])
    for stage in cfg.stages:
        if f"{stage.name}_steps" in a:
            stage.overrides.append(f"trainer.steps={int(a[f'{stage.name}_steps'])}")
    out = Path(cfg.out)
    print(f"[demo] pipeline {cfg.name}: data -> {' -> '.join(s.name for s in cfg.stages)} -> evaluation ({out})", flush=True)
    if run_pipeline(cfg) != 0:
        raise SystemExit("[demo] the pipeline stopped before finishing; run `make demo` again to resume")
    state = json.loads((out / "pipeline.json").read_text())
    last = cfg.stages[-1].name
    walk = out / "walk.json"
    if not walk.exists():
        print(f"[demo] inference: a walk from the {last} bundle", flush=True)
        render_video(Path(state["stages"][last]["bundle"]), out / "data", out)
    names = [s.name for s in cfg.stages]
    rewards = rl_rewards(cfg, state) if "rl" in names else {}
    report = {"pipeline": state, "report": str(out / "report.md"), "video": str(out / "walk.mp4"), "rl_rewards": rewards,
              "seconds": round(time.time() - t_all, 1)}
    (out / "demo_report.json").write_text(json.dumps(report, indent=1))
    md = (out / "report.md").read_text()
    for section in ("## Summary", "## Long: return path", "## Control"):
        if section in md:
            print("\n".join(ln for ln in md.split(section, 1)[1].split("\n## ", 1)[0].splitlines() if ln.startswith("|")))
    print(f"\n[demo] done in {report['seconds']:.0f}s")
    for s in cfg.stages:
        r = state["stages"][s.name]
        print(f"  {s.name:<10} loss {r['loss_start']:.4f} -> {r['loss_end']:.4f} in {r['step']} steps ({r['seconds']}s); "
              f"bundle {r['bundle']}")
    for name, (before, after) in rewards.items():
        print(f"  rl reward  {name:<10} {before:.3f} -> {after:.3f} (mid-train bundle -> RL bundle, fixed paths)")
    print(f"  video      {out / 'walk.mp4'} (sidecar {out / 'walk.json'})")
    print(f"  report     {out / 'report.md'} (evaluation: {out / 'eval' / 'report.md'})")
    for s in cfg.stages:
        r = state["stages"][s.name]
        if s.check_loss and not r["loss_end"] < r["loss_start"]:
            raise SystemExit(f"[demo] {s.name} loss did not fall ({r['loss_start']:.4f} -> {r['loss_end']:.4f})")
    return report


def rl_rewards(cfg, state: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each RL reward of the RL stage's parent and of its result, on the RL run's fixed evaluation paths."""
    from omegaconf import OmegaConf

    from rl.evaluate import evaluate_bundle
    from train.pipeline import compose_experiment

    stage = next(s for s in cfg.stages if s.name == "rl")
    parent = state["stages"][stage.init]["bundle"]
    data = str(Path(cfg.out) / "data")
    rl_cfg = OmegaConf.to_object(compose_experiment(stage.experiment, [f"data.path={data}", f"init={parent}", *stage.overrides]))
    before = evaluate_bundle(parent, rl_cfg.stage, rl_cfg.stage.paths.data or data, "cpu")
    after = evaluate_bundle(state["stages"]["rl"]["bundle"], rl_cfg.stage, rl_cfg.stage.paths.data or data, "cpu")
    return {k: (float(before[k]), float(after[k])) for k in sorted(set(before) & set(after))}


if __name__ == "__main__":
    main()
