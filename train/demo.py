"""``make demo``: the whole pipeline on the embedded default, on a CPU, in a few minutes.

synthetic world -> pretrain (tiny block-causal model) -> mid-train with memory -> bundle
-> a video rendered from the bundle by the inference module -> evaluation of that video.

Every step is the real code path: the data CLI, the Hydra-composed training configs
(``experiment=demo`` / ``demo_midtrain``) run through ``train.run``, the inference player and the
evaluation protocol. Re-running resumes: finished stages are not trained again.

    python -m train.demo [out=DIR] [clips=N] [pretrain_steps=N] [midtrain_steps=N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.schema import register_configs


def _args(argv: list[str]) -> dict[str, str]:
    out = {}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"train.demo: arguments are KEY=VALUE, got {a!r} (keys: out, clips, pretrain_steps, midtrain_steps)")
        k, v = a.split("=", 1)
        out[k] = v
    return out


def losses(run_dir: Path) -> tuple[float, float]:
    """First and last logged training loss of a run (metrics.jsonl)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    vals = [r["loss"] for r in rows if "loss" in r]
    if not vals:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no loss records")
    return float(vals[0]), float(vals[-1])


def train_stage(experiment: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Compose ``experiment=<experiment>`` with overrides and run it in ``run_dir`` (resuming if present)."""
    from train.run import run

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=[f"experiment={experiment}", "checkpoint.resume=latest", *overrides])
    t0 = time.time()
    result = run(cfg, run_dir)
    first, last = losses(run_dir)
    return {"run_dir": str(run_dir), "bundle": str(run_dir / "export" / "bundle"), "steps": result.step, "loss_start": first, "loss_end": last, "seconds": round(time.time() - t0, 1)}


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
    cmd = [sys.executable, "-m", "infer", "--bundle", str(bundle), "--image", str(first_frame_png(data, out)), "--pose", pose, "--out", str(video), "--seed", "0"]
    subprocess.run(cmd, check=True)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    return {"video": str(video), "sidecar": str(video.with_suffix(".json")), "command": " ".join(cmd[1:]), "timings": sidecar.get("timings", {})}


def evaluate(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """``python -m eval`` on both bundles (one table, as ablations are read) over held-out clips."""
    held_out = out / "heldout"
    if not (held_out / "index.json").exists():
        subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(held_out), "--clips", "2", "--frames", "93", "--size", "32", "--trajectory", "revisit", "--seed", "1000"], check=True)
    eval_dir = out / "eval"
    cmd = [sys.executable, "-m", "eval", "--bundle", report["pretrain"]["bundle"], "--name", "pretrain", "--bundle", report["midtrain"]["bundle"], "--name", "midtrain",
           "--protocol", "short,long", "--data", str(held_out), "--out", str(eval_dir), "--num", "1", "--long-latents", "48"]
    subprocess.run(cmd, check=True)
    table = [ln for ln in (eval_dir / "report.md").read_text().splitlines() if ln.startswith("|")]
    print("\n".join(table[:8]))
    return {"report": str(eval_dir / "report.md"), "command": " ".join(cmd[1:])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(sys.argv[1:] if argv is None else argv)
    out = Path(a.get("out", "outputs/demo")).resolve()
    clips = int(a.get("clips", "48"))
    register_configs()
    report: dict[str, Any] = {}
    t_all = time.time()

    data = out / "data"
    if not (data / "index.json").exists():
        print(f"[demo] 1/5 synthetic world -> {data}", flush=True)
        cmd = [sys.executable, "-m", "data.synthetic", "--out", str(data), "--clips", str(clips), "--frames", "93", "--size", "32", "--trajectory", "mixed", "--seed", "0"]
        subprocess.run(cmd, check=True)
    report["data"] = str(data)

    print("[demo] 2/5 pretrain: tiny block-causal world model", flush=True)
    common = [f"data.path={data}", "logger.progress_bar=false"]
    steps = [f"trainer.steps={a['pretrain_steps']}"] if "pretrain_steps" in a else []
    report["pretrain"] = train_stage("demo", out / "pretrain", common + steps)

    print("[demo] 3/5 mid-train: reconstituted context memory", flush=True)
    steps = [f"trainer.steps={a['midtrain_steps']}"] if "midtrain_steps" in a else []
    report["midtrain"] = train_stage("demo_midtrain", out / "midtrain", common + steps + [f"init={report['pretrain']['bundle']}"])

    print("[demo] 4/5 inference: a video from the mid-trained bundle", flush=True)
    report["video"] = render_video(Path(report["midtrain"]["bundle"]), data, out)

    print("[demo] 5/5 evaluation: pretrain vs mid-train bundle on held-out clips", flush=True)
    report["eval"] = evaluate(report, out)

    report["seconds"] = round(time.time() - t_all, 1)
    (out / "demo_report.json").write_text(json.dumps(report, indent=1))
    print("\n[demo] done in {:.0f}s".format(report["seconds"]))
    print(f"  data       {report['data']}")
    for stage in ("pretrain", "midtrain"):
        r = report[stage]
        print(f"  {stage:<10} loss {r['loss_start']:.4f} -> {r['loss_end']:.4f} in {r['steps']} steps ({r['seconds']}s); bundle {r['bundle']}")
    print(f"  video      {report['video']['video']} (sidecar {report['video']['sidecar']})")
    print(f"  evaluation {report['eval']['report']}")
    print(f"  report     {out / 'demo_report.json'}")
    for stage in ("pretrain", "midtrain"):
        r = report[stage]
        if not r["loss_end"] < r["loss_start"]:
            raise SystemExit(f"[demo] {stage} loss did not fall ({r['loss_start']:.4f} -> {r['loss_end']:.4f})")
    return report


if __name__ == "__main__":
    main()
