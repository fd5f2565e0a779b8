"""Requeue a preempted SLURM job: the launcher's half of preemption handling.

The trainer knows nothing of SLURM: on SIGUSR1/SIGTERM it checkpoints, writes ``status.json``
(``"preempted"``) in its run directory and exits with ``PREEMPTED_EXIT_CODE`` (75). Whoever
launched it decides what happens next; under SLURM that is this module:

- the sbatch script written by :mod:`launch.slurm` runs ``python -m launch.requeue`` after ``srun``
  returns, when every rank has exited (``launch.task`` turns exit 75 into 0 so that no rank is killed
  early, and torchrun reports its own code anyway: ``status.json`` is what counts);
- a Hydra sweep point calls :func:`decide` / :func:`requeue_job` from :mod:`launch.sweep`.

``scontrol requeue`` puts the job back in the queue under the same job id; it restarts from the top
of its script with ``SLURM_RESTART_COUNT`` incremented and, given the same run directory and
``checkpoint.resume=latest``, continues from the checkpoint just written.

    python -m launch.requeue --run-dir DIR --exit-code RC [--max-requeues N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from train.signals import PREEMPTED_EXIT_CODE

STATUS_FILE = "status.json"  # written by train.trainer.Trainer at the end of every attempt
DEFAULT_MAX_REQUEUES = 100


def read_status(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The trainer's ``status.json`` in ``run_dir``; None if absent or unreadable (a killed attempt)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) else None


def decide(status: Optional[Mapping[str, Any]], exit_code: int, restarts: int, max_requeues: int) -> tuple[bool, str]:
    """Whether to requeue after an attempt, and why (a line for the job log).

    Preempted = ``status["status"] == "preempted"`` or the exit code 75 (single-process launches).
    ``restarts`` is ``SLURM_RESTART_COUNT`` (requeues so far); past ``max_requeues`` the job stops.
    """
    state = (status or {}).get("status")
    preempted = state == "preempted" or exit_code == PREEMPTED_EXIT_CODE
    if not preempted:
        what = f"status {state}" if state else "no status.json"
        return False, f"not requeued: {what}, exit code {exit_code}"
    step = (status or {}).get("step", "?")
    if restarts >= max_requeues:
        return False, f"not requeued: preempted at step {step} but already requeued {restarts} times (max {max_requeues})"
    return True, f"preempted at step {step} (signal {(status or {}).get('signal')}): requeue {restarts + 1}"


def job_id(environ: Optional[Mapping[str, str]] = None) -> str:
    """This SLURM job's id for ``scontrol`` (``ARRAYID_TASKID`` inside a job array)."""
    e = os.environ if environ is None else environ
    if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    if not e.get("SLURM_JOB_ID"):
        raise RuntimeError("launch.requeue: SLURM_JOB_ID is not set; requeueing only works inside a SLURM job")
    return e["SLURM_JOB_ID"]


def requeue_job(jid: str) -> None:
    """``scontrol requeue JID``: SLURM stops this job and queues it again (same id, same script)."""
    done = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {jid} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def after_attempt(run_dir: str | Path, exit_code: int, max_requeues: int = DEFAULT_MAX_REQUEUES, environ: Optional[Mapping[str, str]] = None) -> int:
    """Decide, requeue if preempted, and return the exit code the job should end with."""
    e = os.environ if environ is None else environ
    restarts = int(e.get("SLURM_RESTART_COUNT") or 0)
    status = read_status(run_dir)
    requeue, why = decide(status, exit_code, restarts, max_requeues)
    print(f"[worldsmith] {why}", flush=True)
    if not requeue:
        failed = status is not None and status.get("status") != "completed"
        return exit_code or (1 if failed else 0)
    jid = job_id(e)
    requeue_job(jid)
    print(f"[worldsmith] job {jid} requeued; it resumes from the latest checkpoint in {run_dir}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.requeue", description="requeue this SLURM job if its training attempt was preempted")
    ap.add_argument("--run-dir", required=True, help="the run directory (holds status.json)")
    ap.add_argument("--exit-code", type=int, required=True, help="exit code of the training step (srun)")
    ap.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES, help="stop requeueing after this many requeues")
    args = ap.parse_args(argv)
    return after_attempt(args.run_dir, args.exit_code, args.max_requeues)


if __name__ == "__main__":
    sys.exit(main())
