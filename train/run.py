"""Build a run from its resolved config and train it: the body of ``python -m train``.

Also used by ``train.demo`` and the tests, so every way of starting a run goes through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

import train.stages  # noqa: F401  (registers pretrain / midtrain)
from train.stage import build_stage
from train.trainer import FitResult, Trainer


def write_resolved_config(cfg: DictConfig, run_dir: Path, overrides: Optional[list[str]] = None) -> Path:
    """``<run_dir>/config.yaml``: the fully resolved config of this run (atomic), headed by its command's overrides."""
    from train.checkpoint import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    header = "" if overrides is None else "# python -m train " + " ".join(overrides) + "\n"
    write_text_atomic(path, header + OmegaConf.to_yaml(cfg, resolve=True))
    return path


def import_stage_packages() -> None:
    """Stages outside ``train`` register themselves on import; import those that exist."""
    import importlib

    for mod in ("rl.stage", "distill.stage"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name not in (mod, mod.split(".")[0]):
                raise


def run(cfg: DictConfig, run_dir: str | Path, *, overrides: Optional[list[str]] = None, exclude: Optional[list[str]] = None) -> FitResult:
    """Train ``cfg`` in ``run_dir``; returns how the run ended (completed / preempted / dry_run).

    ``overrides`` (the command line's, from ``python -m train``) go into ``run.json`` and the head of
    ``config.yaml``; ``exclude`` are the keys left out of the run's id (``train/runs.py``). A config
    that fails its checks leaves ``status.json`` = failed with the error, like any failed run.
    """
    from configs.schema import check_known_keys
    from train.trainer import write_status

    run_dir = Path(run_dir)
    try:
        check_known_keys(cfg)
        obj: Any = OmegaConf.to_object(cfg)  # typed dataclasses all the way down; runs every value check
        if overrides is not None:
            from train.runs import write_run_info

            write_run_info(run_dir, str(obj.name), overrides, exclude or ())
        write_resolved_config(cfg, run_dir, overrides)
        import_stage_packages()
        stage = build_stage(obj.stage.name, obj)
    except Exception as e:
        write_status(run_dir, "failed", 0, error=f"{type(e).__name__}: {e}")
        raise
    trainer = Trainer(
        obj.trainer,
        stage,
        run_dir,
        optim=obj.optim,
        schedule=obj.schedule,
        dist=obj.dist,
        logger=obj.logger,
        checkpoint=obj.checkpoint,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    result = trainer.fit()
    if trainer.env.is_main:
        print(f"[worldsmith] {obj.stage.name}: {result.status} at step {result.step}; run directory {run_dir}")
    if result.status == "preempted":
        raise SystemExit(result.exit_code)
    return result
