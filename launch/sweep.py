"""Preemption for Hydra sweeps on SLURM (``hydra/launcher=slurm``, hydra-submitit-launcher).

Each sweep point runs as a task of one SLURM job array, in ``<sweep dir>/<num>_<swept values>/``.
The stock launcher does not know our trainer: on SIGUSR1/SIGTERM the trainer checkpoints, writes
``status.json`` (``"preempted"``) and ends with ``SystemExit(75)``, which submitit records as
neither a result nor an error. :class:`RequeueOnPreemption`, a Hydra callback configured by the
``slurm`` launcher preset, closes the loop at the exit of task 0:

1. it makes the point's submission (submitit's pickled call, rerun by a requeued job) carry
   ``checkpoint.resume=latest`` -- excluded from directory names, so the point keeps its directory;
2. it runs ``scontrol requeue`` (:mod:`launch.requeue`): the point restarts under the same job id
   and continues from the checkpoint just written, while ``python -m train -m`` keeps waiting.

Outside the training loop (start-up, export) submitit's own SIGUSR1 handler is in charge: it
requeues the same submission without a new checkpoint.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from launch.requeue import DEFAULT_MAX_REQUEUES, STATUS_FILE, decide, job_id, read_status, requeue_job

RESUME_OVERRIDE = "checkpoint.resume=latest"


def with_resume(overrides: list[str]) -> list[str]:
    """``overrides`` plus ``checkpoint.resume=latest`` unless they already set ``checkpoint.resume``."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return list(overrides) if "checkpoint.resume" in keys else [*overrides, RESUME_OVERRIDE]


def resume_on_rerun() -> bool:
    """Rewrite this submitit job's submission so that a rerun resumes; False if it already did."""
    from submitit import JobEnvironment
    from submitit.core.utils import DelayedSubmission

    path = JobEnvironment().paths.submitted_pickle
    delayed = DelayedSubmission.load(path)
    overrides = list(delayed.args[0])  # the launcher's call: (sweep overrides, dir key, job num, job id, state)
    new_overrides = with_resume(overrides)
    if new_overrides == overrides:
        return False
    rerun = DelayedSubmission(delayed.function, new_overrides, *delayed.args[1:], **delayed.kwargs)
    rerun.set_timeout(delayed._timeout_min, delayed._timeout_countdown)  # what submitit's own checkpointing keeps
    tmp = path.with_name(path.name + ".tmp")
    rerun.dump(tmp)
    os.replace(tmp, path)
    return True


def requeue_if_preempted(run_dir: Path, started: float, max_requeues: int = DEFAULT_MAX_REQUEUES) -> bool:
    """At the exit of task 0: requeue when this attempt's ``status.json`` says preempted. Returns whether it did."""
    status_path = Path(run_dir) / STATUS_FILE
    fresh = status_path.is_file() and status_path.stat().st_mtime >= started
    status = read_status(run_dir) if fresh else None  # an older file is a previous attempt's
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    requeue, why = decide(status, 0, restarts, max_requeues)
    if not requeue:
        return False
    print(f"[worldsmith] sweep point {run_dir.name}: {why}", flush=True)
    if resume_on_rerun():
        print(f"[worldsmith] the rerun gets {RESUME_OVERRIDE}", flush=True)
    jid = job_id()
    requeue_job(jid)
    print(f"[worldsmith] job {jid} requeued; it resumes from the latest checkpoint in {run_dir}", flush=True)
    return True


class RequeueOnPreemption(Callback):
    """Hydra callback: in a submitit SLURM task 0, requeue the point at exit if it was preempted."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        in_submitit_slurm = "SUBMITIT_FOLDER" in os.environ and "SLURM_JOB_ID" in os.environ
        if not in_submitit_slurm or int(os.environ.get("SLURM_PROCID", "0")) != 0:
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        started = time.time() - 1.0  # file-system timestamps may be coarse
        atexit.register(_at_exit, run_dir, started)


def _at_exit(run_dir: Path, started: float) -> None:
    try:
        requeue_if_preempted(run_dir, started)
    except Exception as e:  # at exit nothing can be raised usefully; say why there is no requeue
        print(f"[worldsmith] sweep point {run_dir.name}: not requeued: {type(e).__name__}: {e}", flush=True)
