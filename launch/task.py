"""``python -m launch.task MODULE [args]``: what ``srun`` starts on each task of a training job.

Runs ``python -m MODULE args`` in this process, with three SLURM-specific touches:

- SIGUSR1 is ignored until the trainer installs its handler (``train.signals``). SLURM signals
  every process of a step, and USR1's default action kills: the torchrun agent (which runs under
  this wrapper too) must survive it while its workers checkpoint, and a signal during start-up
  must not kill a process before it can resume anything. Processes the agent starts inherit this.
- ``PET_NODE_RANK`` (torchrun's ``--node-rank``) is set from ``SLURM_NODEID``, so one command line
  serves every node of a static torchrun rendezvous.
- The trainer's preemption exit (``SystemExit(75)``) becomes exit code 0. Otherwise the first rank
  to exit would make torchrun (or ``srun --kill-on-bad-exit``) kill the others, possibly before
  rank 0 has written ``status.json``; the requeue decision reads that file (``launch.requeue``).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from train.signals import PREEMPTED_EXIT_CODE


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python -m launch.task MODULE [args]  (e.g. launch.task train experiment=demo)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if "SLURM_NODEID" in os.environ:
        os.environ.setdefault("PET_NODE_RANK", os.environ["SLURM_NODEID"])
    module, args = argv[0], argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code == PREEMPTED_EXIT_CODE:
            if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
                print(f"[worldsmith] {module}: preempted (exit {PREEMPTED_EXIT_CODE}); task exits 0, the job script decides on requeue", flush=True)
            return 0
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
