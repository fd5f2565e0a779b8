"""``python -m train.pipeline NAME``: data -> training stages -> evaluation, one resumable command on a time budget.

    python -m train.pipeline gpu_small                         # configs/pipeline/gpu_small.yaml
    python -m train.pipeline gpu_small stop_after=560 export=$OUT   # stop cleanly after 560 s; copy the report out
    python -m train.pipeline demo out=outputs/demo             # the CPU demo's training + evaluation

A pipeline (``configs/pipeline/NAME.yaml``, schema :class:`PipelineConfig`) renders its synthetic
world (train and held-out sets), runs its stages in order (each a normal ``python -m train`` run
composed from an experiment file, ``init=`` the bundle of an earlier stage), then evaluates the
chosen bundles (and sampling variants of them, e.g. memory off) with ``python -m eval``'s code on
the held-out set, and writes ``report.md`` + ``pipeline.json`` in its output directory.

**Time budget.** A stage with ``minutes`` > 0 first runs ``probe_steps`` steps to measure its
steps/s on this machine, then trains for ``minutes`` worth of steps (fixed from then on, so a
resumed run trains exactly what an uninterrupted one would).

**Resumable.** Everything lands in ``out``; ``pipeline.json`` records what is done. Run the same
command again and finished phases are skipped, an interrupted stage resumes from its last
checkpoint. ``stop_after=S`` stops cleanly after S seconds (a training stage saves a checkpoint at
its next step; a phase that would not finish in time is not started) and exits with code 75:
machines that cap one command's time run the command again until it exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from configs import CONFIG_DIR
from train.signals import PREEMPTED_EXIT_CODE

__all__ = ["DataSpec", "StageSpec", "EvalSpec", "PipelineConfig", "load_pipeline", "run_pipeline", "main"]

PIPELINE_DIR = Path(CONFIG_DIR) / "pipeline"


@dataclass
class DataSpec:
    """The synthetic training and held-out sets (``python -m data.synthetic`` arguments)."""

    clips: int = 48
    frames: int = 65
    size: int = 32
    stride: int = 1  # video frames per latent of the trajectories: the autoencoder's temporal stride
    latent_translation: float = 0.08  # units per latent of a held move key
    latent_rotation: float = 3.0  # degrees per latent of a held turn key
    trajectory: str = "mixed"
    supersample: int = 1
    seed: int = 0
    device: str = "cpu"  # where frames are ray cast (cuda: batches of clips by the main process)
    workers: int = 1  # CPU rendering processes; with device=cuda, trajectory-planning processes (e.g. 12 on 16 cores)
    batch: Optional[int] = None  # clips ray cast per launch sequence (None: 32 on a GPU, 1 on CPU; output is the same)
    video_format: str = "lossless"  # raw: no encoding cost (fast with device=cuda)
    depth: bool = False  # training never reads depth
    heldout_clips: int = 8
    heldout_frames: int = 129
    heldout_trajectory: str = "revisit"
    heldout_seed: int = 1000


@dataclass
class StageSpec:
    """One training run: an experiment file plus overrides, on the pipeline's data."""

    name: str = "pretrain"
    experiment: str = "demo"
    init: Optional[str] = None  # name of an earlier stage whose bundle this one starts from
    minutes: float = 0.0  # > 0: train this long (steps measured by a probe); 0: the experiment's trainer.steps
    probe_steps: int = 40
    min_steps: int = 50
    # Hydra overrides; "{bundle:NAME}" is replaced by the bundle of the earlier stage NAME, "{out}" by the
    # pipeline's output directory (e.g. a distillation stage's stage.teacher={bundle:teacher}).
    overrides: list[str] = field(default_factory=list)
    check_loss: bool = True  # the stage's logged loss must fall (off for adversarial / RL stages)


@dataclass
class EvalSpec:
    """Evaluation of the stages' bundles on the held-out set (``python -m eval``)."""

    stages: list[str] = field(default_factory=list)  # empty: every stage
    protocols: str = "short,long,control"
    num: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    steps: Optional[int] = None  # override the bundles' Euler steps (None: each bundle's own)
    batch: int = 8  # clips per batched rollout
    short_latents: int = 16
    long_latents: Optional[int] = None  # None: 4 x each bundle's training window
    control_latents: int = 16
    variants: list[str] = field(default_factory=list)  # NAME:KEY=VALUE[,KEY=VALUE] (eval --variant)
    variant_stages: list[str] = field(default_factory=list)  # stages the variants apply to (empty: all evaluated)
    denoising_clips: int = 0  # > 0: also the denoising diagnostic (python -m eval.denoising) of each stage's bundle
    minutes: float = 2.0  # expected duration: not started with less time left under stop_after


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    out: str = "outputs/pipeline"
    data: DataSpec = field(default_factory=DataSpec)
    stages: list[StageSpec] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stop_after: float = 0.0  # seconds; > 0: stop cleanly (exit 75) before this much wall time has passed
    export: Optional[str] = None  # copy report.md, pipeline.json and a report tarball here when done


class Stop(Exception):
    """The time budget of this invocation is spent: save what is done and exit 75."""


def load_pipeline(name_or_path: str, overrides: list[str] = ()) -> PipelineConfig:
    """A pipeline config from ``configs/pipeline/<name>.yaml`` (or a yaml path) plus ``key=value`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PIPELINE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))
        raise SystemExit(f"train.pipeline: no pipeline {name_or_path!r} (looked for {path}); known: {known}")
    base = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(base, _read_pipeline_file(path), OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf names the bad key
        raise SystemExit(f"train.pipeline: {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise SystemExit(f"train.pipeline: {path}: stage names must be unique, got {names}")
    for i, s in enumerate(cfg.stages):
        if s.init is not None and s.init not in names[:i]:
            raise SystemExit(f"train.pipeline: {path}: stage {s.name!r} starts from {s.init!r}, which is not an earlier stage")
    for st in [*cfg.eval.stages, *cfg.eval.variant_stages]:
        if st not in names:
            raise SystemExit(f"train.pipeline: {path}: eval names {st!r}, not a stage of {names}")
    for i, s in enumerate(cfg.stages):
        for ref in re.findall(r"\{bundle:([^}]*)\}", " ".join(s.overrides)):
            if ref not in names[:i]:
                raise SystemExit(f"train.pipeline: {path}: stage {s.name!r} refers to {{bundle:{ref}}}, not an earlier stage")
    return cfg


def _read_pipeline_file(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A pipeline yaml as an OmegaConf node. ``extends: NAME`` starts from pipeline NAME: this file's keys
    override NAME's, and this file's ``stages`` come after NAME's (so a pipeline can add stages to another)."""
    node = OmegaConf.load(path)
    parent = node.pop("extends", None)
    if parent is None:
        return node
    base_path = PIPELINE_DIR / f"{parent}.yaml"
    if not base_path.exists():
        raise ValueError(f"extends: {parent!r}: no pipeline {base_path}")
    if base_path.resolve() in seen:
        raise ValueError(f"extends: {parent!r} makes a cycle through {[p.name for p in seen]}")
    base = _read_pipeline_file(base_path, (*seen, path.resolve()))
    stages = list(base.get("stages", [])) + list(node.pop("stages", []))
    merged = OmegaConf.merge(base, node)
    merged.stages = stages
    return merged


class _Clock:
    """Wall time of this invocation against ``stop_after``; SIGALRM turns into a trainer preemption."""

    def __init__(self, stop_after: float):
        self.t0 = time.monotonic()
        self.stop_after = stop_after
        self.training = False

    def left(self) -> float:
        return math.inf if self.stop_after <= 0 else self.stop_after - (time.monotonic() - self.t0)

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise Stop(f"{what} needs about {seconds:.0f} s, {max(self.left(), 0):.0f} s left")

    def arm(self) -> None:
        if self.stop_after > 0:
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))

    def _alarm(self, signum: int, frame: Any) -> None:
        if not self.training:
            raise Stop("time budget spent")
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.setitimer(signal.ITIMER_REAL, 1.0)  # the trainer is still building: ask again in a second
            return
        os.kill(os.getpid(), signal.SIGUSR1)  # the trainer saves a checkpoint at its next step and exits 75


def _state_path(out: Path) -> Path:
    return out / "pipeline.json"


def _load_state(out: Path) -> dict[str, Any]:
    p = _state_path(out)
    return json.loads(p.read_text()) if p.exists() else {"data": {}, "stages": {}, "eval": {}}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from train.checkpoint import write_text_atomic

    write_text_atomic(_state_path(out), json.dumps(state, indent=1))


def make_data(spec: DataSpec, out: Path, state: dict[str, Any], log=print) -> None:
    """Render the training and held-out sets (skipped once recorded as complete in ``state``; a set cut off
    by the time budget keeps the clips it wrote, so it is rendered again from scratch)."""
    from data.synthetic.__main__ import main as synthetic

    sets = (("train", out / "data", spec.clips, spec.frames, spec.trajectory, spec.seed),
            ("heldout", out / "heldout", spec.heldout_clips, spec.heldout_frames, spec.heldout_trajectory, spec.heldout_seed))
    for name, path, clips, frames, kind, seed in sets:
        if name in state["data"] and (path / "index.json").exists():
            continue
        t0 = time.perf_counter()
        argv = ["--out", str(path), "--clips", str(clips), "--frames", str(frames), "--size", str(spec.size),
                "--trajectory", kind, "--seed", str(seed), "--stride", str(spec.stride),
                "--latent-translation", str(spec.latent_translation), "--latent-rotation", str(spec.latent_rotation),
                "--supersample", str(spec.supersample), "--device", spec.device, "--video-format", spec.video_format,
                "--overwrite"]
        argv += ["--workers", str(spec.workers)]
        if spec.batch is not None:
            argv += ["--batch", str(spec.batch)]
        if not spec.depth:
            argv.append("--no-depth")
        synthetic(argv)
        seconds = time.perf_counter() - t0
        state["data"][name] = {"path": str(path), "clips": clips, "frames": frames, "seconds": round(seconds, 2),
                               "frames_per_s": round(clips * frames / seconds, 1)}
        log(f"[pipeline] data {name}: {clips} clips x {frames} frames in {seconds:.1f} s "
            f"({clips * frames / seconds:.0f} frames/s on {spec.device})")


def compose_experiment(experiment: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from configs.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def _train(cfg, run_dir: Path, clock: _Clock) -> Any:
    """train.run.run under the pipeline's clock; a preempted run raises Stop."""
    from train.run import run

    clock.training = True
    try:
        return run(cfg, run_dir)
    except SystemExit as e:
        if e.code == PREEMPTED_EXIT_CODE:
            raise Stop(f"training in {run_dir} preempted at the time budget (checkpoint saved)") from None
        raise
    finally:
        clock.training = False


def run_stage(spec: StageSpec, out: Path, state: dict[str, Any], clock: _Clock, log=print) -> None:
    """Probe (if timed), train (resuming), record steps / seconds / losses in ``state``."""
    rec = state["stages"].setdefault(spec.name, {})
    if rec.get("done"):
        return
    run_dir = out / spec.name

    def resolve(o: str) -> str:
        o = o.replace("{out}", str(out))
        return re.sub(r"\{bundle:([^}]*)\}", lambda m: state["stages"][m.group(1)]["bundle"], o)

    common = [f"data.path={out / 'data'}", "logger.progress_bar=false", "logger.wandb=false", *map(resolve, spec.overrides)]
    if spec.init is not None:
        common.append(f"init={state['stages'][spec.init]['bundle']}")
    if spec.minutes > 0 and "steps" not in rec:
        clock.need(60, f"the {spec.name} probe")
        probe = out / f"{spec.name}_probe"
        shutil.rmtree(probe, ignore_errors=True)
        pcfg = compose_experiment(spec.experiment, [*common, f"trainer.steps={spec.probe_steps}", "checkpoint.every=0",
                                          "trainer.export=false", "trainer.sample_every=0",
                                          f"logger.log_every={max(1, spec.probe_steps // 4)}"])
        _train(pcfg, probe, clock)
        rows = [r for r in _metrics(probe) if "perf/it_per_s" in r]
        rate = float(rows[-1]["perf/it_per_s"])  # the last interval: after compilation and warm-up
        rec["probe_it_per_s"] = round(rate, 3)
        planned = int(spec.minutes * 60 * rate)
        rec["steps"] = max(spec.min_steps, planned)
        shutil.rmtree(probe, ignore_errors=True)
        _save_state(out, state)
        log(f"[pipeline] {spec.name}: {rate:.2f} steps/s -> {rec['steps']} steps for {spec.minutes} min")
        if planned < spec.min_steps:
            log(f"[pipeline] warning: {spec.name}'s min_steps={spec.min_steps} overrides the {planned} steps that fit "
                f"{spec.minutes} min: about {spec.min_steps / rate / 60:.1f} min")
    steps = [f"trainer.steps={rec['steps']}"] if "steps" in rec else []
    cfg = compose_experiment(spec.experiment, [*common, *steps, "checkpoint.resume=latest"])
    t0 = time.perf_counter()
    rec["started"] = True
    _save_state(out, state)
    try:
        result = _train(cfg, run_dir, clock)
    finally:
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.perf_counter() - t0, 1)
        _save_state(out, state)
    losses = [r["loss"] for r in _metrics(run_dir) if "loss" in r]
    rec.update(done=True, step=result.step, run_dir=str(run_dir), bundle=str(run_dir / "export" / "bundle"),
               loss_start=losses[0] if losses else None, loss_end=losses[-1] if losses else None)
    _save_state(out, state)
    log(f"[pipeline] {spec.name}: {result.step} steps in {rec['seconds']:.0f} s, loss "
        f"{rec['loss_start']:.4f} -> {rec['loss_end']:.4f}")
    if spec.check_loss and losses and not losses[-1] < losses[0]:
        log(f"[pipeline] warning: {spec.name}'s loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")


def run_eval(cfg: PipelineConfig, out: Path, state: dict[str, Any], clock: _Clock, log=print) -> None:
    """Evaluate the chosen stages' bundles (and their variants) on the held-out set."""
    from eval.__main__ import evaluate_bundles, parse_variant
    from eval.lpips import LPIPSConfig
    from eval.protocols import ProtocolConfig

    e = cfg.eval
    # What was evaluated: a pipeline that extends this one (more stages, other rows) evaluates again.
    signature = json.dumps({**dataclasses.asdict(e), "stages": e.stages or [s.name for s in cfg.stages]}, sort_keys=True)
    if state["eval"].get("done") and state["eval"].get("signature", signature) == signature:
        return
    clock.need(e.minutes * 60, "evaluation")
    names = e.stages or [s.name for s in cfg.stages]
    with_variants = e.variant_stages or names
    pcfg = ProtocolConfig(num=e.num, seed=e.seed, device=e.device, dtype=e.dtype, steps=e.steps, batch=e.batch,
                          short_latents=e.short_latents,
                          long_latents=e.long_latents, control_latents=e.control_latents, lpips=LPIPSConfig())
    t0 = time.perf_counter()
    partial = out / "eval" / "report.md"
    partial.unlink(missing_ok=True)  # a report left by an earlier, cut-off call would describe fewer rows
    try:
        files = evaluate_bundles([state["stages"][n]["bundle"] for n in names], out / "heldout", out / "eval",
                                 e.protocols, pcfg, names, log=log, variants=[parse_variant(v) for v in e.variants],
                                 variant_bundles=[state["stages"][n]["bundle"] for n in with_variants], resume=True)
    except Stop:
        if partial.exists():  # the rows finished before the time budget ran out, reported as such
            state["eval"] = {"partial": str(partial), "seconds": round(time.perf_counter() - t0, 1)}
        raise
    diagnostic = None
    if e.denoising_clips > 0:
        diagnostic = str(run_denoising(names, [state["stages"][n]["bundle"] for n in names], out, pcfg, e.denoising_clips))
    state["eval"] = {"done": True, "report": str(files.markdown), "json": str(files.json), "denoising": diagnostic,
                     "seconds": round(time.perf_counter() - t0, 1), "signature": signature}
    _save_state(out, state)


def run_denoising(names: list[str], bundles: list[str], out: Path, pcfg: Any, clips: int) -> Path:
    """The denoising diagnostic of each bundle (eval/denoising.py) -> ``out/eval/denoising.{md,json}``."""
    from eval.denoising import diagnose, format_report
    from eval.protocols import VideoModel

    results, md = {}, []
    for name, bundle in zip(names, bundles):
        model = VideoModel.from_bundle(bundle, device=pcfg.device, dtype=pcfg.dtype, steps=pcfg.steps, name=name)
        results[name] = diagnose(model, out / "heldout", clips, seed=pcfg.seed)
        md.append(format_report(results[name]).replace("# Denoising diagnostic", "### Denoising diagnostic", 1))
        del model
    (out / "eval" / "denoising.json").write_text(json.dumps(results, indent=1))
    path = out / "eval" / "denoising.md"
    path.write_text("\n".join(md))
    return path


def write_summary(cfg: PipelineConfig, out: Path, state: dict[str, Any]) -> Path:
    """``report.md``: what ran (data, stages: steps, time, losses) followed by the evaluation report."""
    md = [f"# Pipeline `{cfg.name}`", "", f"Output: `{out}`.", "", "## Data", "",
          "| set | clips | frames | seconds | frames/s |", "|---|---|---|---|---|"]
    for name, d in state["data"].items():
        md.append(f"| {name} | {d['clips']} | {d['frames']} | {d['seconds']} | {d['frames_per_s']} |")
    md += ["", f"Renderer: {cfg.data.size}x{cfg.data.size}, supersample {cfg.data.supersample}, on {cfg.data.device}; "
           f"{cfg.data.latent_translation} units / {cfg.data.latent_rotation} deg per latent.", "",
           "## Stages", "", "| stage | experiment | init | steps | probe steps/s | seconds | loss start | loss end |",
           "|---|---|---|---|---|---|---|---|"]
    for s in cfg.stages:
        r = state["stages"].get(s.name, {})
        fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        md.append(f"| {s.name} | {s.experiment} | {s.init or '—'} | {r.get('step', '—')} | {r.get('probe_it_per_s', '—')} | "
                  f"{r.get('seconds', '—')} | {fmt(r.get('loss_start'))} | {fmt(r.get('loss_end'))} |")
    plots = [p for s in cfg.stages if state["stages"].get(s.name, {}).get("done") for p in plot_stage_curves(out, s.name)]
    if plots:
        md += ["", "## Training curves", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    done, partial = state["eval"].get("done"), state["eval"].get("partial")
    if done or partial:
        body = Path(state["eval"]["report" if done else "partial"]).read_text().split("\n", 1)[1]
        title = f"## Evaluation ({state['eval']['seconds']} s)" if done else \
            f"## Evaluation, cut off by the time budget after {state['eval']['seconds']} s (the rows finished so far)"
        md += ["", title, "", body.replace("](plots/", "](eval/plots/").replace("](strips/", "](eval/strips/")]
    if done and state["eval"].get("denoising"):
        md += ["", "## Where frames lose the scene (`python -m eval.denoising`)", "",
               "Teacher-forced: a chunk's x̂0 at each σ after a clean chunk, against the noisy input and the first "
               "frame held still; sampler: the x̂0 of each call on the first chunk (eval/README.md).", "",
               Path(state["eval"]["denoising"]).read_text()]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


# Curves drawn per finished stage: (file suffix, title, which logged keys).
_CURVES = (
    ("loss", "training loss", lambda k: k == "loss" or k.startswith("loss/")),
    ("rewards", "reward components (mean over candidates)", lambda k: k.startswith("reward/") and k.count("/") == 1),
)


def plot_stage_curves(out: Path, stage: str) -> list[Path]:
    """PNG plots of a stage's logged loss and reward components against the step (``out/plots/<stage>_*.png``)."""
    from eval.report import line_plot

    rows = _metrics(out / stage)
    paths = []
    for suffix, title, wanted in _CURVES:
        keys = sorted({k for r in rows for k in r if wanted(k)})
        series = {k: ([r["step"] for r in rows if k in r], [float(r[k]) for r in rows if k in r]) for k in keys}
        if any(len(x) > 1 for x, _ in series.values()):
            paths.append(line_plot(out / "plots" / f"{stage}_{suffix}.png", series, f"{stage}: {title}", "step", suffix))
    return paths


def export_report(out: Path, dest: Path) -> list[Path]:
    """Copy report.md, pipeline.json, the evaluation's report.json and a tarball of plots, strips and
    stage metrics to ``dest`` (a few small files, for machines that only return a handful)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for src, name in ((out / "report.md", "report.md"), (out / "pipeline.json", "pipeline.json"),
                      (out / "eval" / "report.json", "eval_report.json"), (out / "eval" / "denoising.json", "denoising.json")):
        if src.exists():
            files.append(Path(shutil.copy(src, dest / name)))
    tar = dest / "report.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for sub in ("plots", "eval/plots", "eval/strips"):
            if (out / sub).exists():
                t.add(out / sub, arcname=sub)
        for m in sorted(out.glob("*/metrics.jsonl")):
            t.add(m, arcname=str(m.relative_to(out)))
        for c in sorted(out.glob("*/config.yaml")):
            t.add(c, arcname=str(c.relative_to(out)))
    files.append(tar)
    return files


def run_pipeline(cfg: PipelineConfig, log=print) -> int:
    """Run (or resume) the whole pipeline; 0 when finished, 75 when stopped at the time budget."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    state = _load_state(out)
    clock = _Clock(cfg.stop_after)
    clock.arm()
    code = 0
    try:
        make_data(cfg.data, out, state, log)
        _save_state(out, state)
        for spec in cfg.stages:
            run_stage(spec, out, state, clock, log)
        run_eval(cfg, out, state, clock, log)
    except Stop as e:
        log(f"[pipeline] stopped: {e}. Run the same command again to resume.")
        code = PREEMPTED_EXIT_CODE
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _save_state(out, state)
        report = write_summary(cfg, out, state)
        if cfg.export:
            for f in export_report(out, Path(cfg.export)):
                log(f"[pipeline] exported {f}")
    log(f"[pipeline] {'done' if code == 0 else 'stopped'}: {report}")
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        known = sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))
        raise SystemExit(f"usage: python -m train.pipeline NAME [key=value ...]; NAME one of {known} or a yaml path")
    cfg = load_pipeline(argv[0], argv[1:])
    return run_pipeline(cfg)


if __name__ == "__main__":
    sys.exit(main())
