"""``python -m launch.slurm``: write and submit the sbatch script of one training run.

    python -m launch.slurm experiment=NAME [overrides] --nodes N --gpus-per-node G \\
        [--partition P] [--time T] [--account A] [--cluster PRESET] [--python PATH]
        [--nccl-debug LEVEL] [--nccl-ifname IFACE] [--dry-run]

The script starts one ``torchrun`` per node with ``srun`` (``--launcher srun``: one task per
process instead, ranks taken from SLURM's variables by ``train.distributed``); the rendezvous is
the first host of ``SLURM_JOB_NODELIST`` and a port derived from the job id. The run directory is
fixed at submission (``outputs/<name>/<time>_<slug>_<id>``, as ``python -m train`` would name it;
with ``checkpoint.resume=latest`` the newest earlier run of the same command) and the run always
starts with ``checkpoint.resume=latest``, so a requeued job resumes into the same directory,
checkpoints and wandb run.

Checked before anything is written or queued: the config (composed and validated like ``python -m
train``), the GPU request (``--gpus-per-node`` or the preset's ``gpus_per_node`` / ``gres``; 0 is a
CPU job, nothing is an error), the time limit against ``signal_delay_s``. The job's interpreter is
the ``python`` of the environment the preset's setup lines activate (``--python`` to name one; the
submitting interpreter only when the preset has no setup). A failed ``sbatch`` leaves no directory. Preemption: SLURM sends SIGUSR1 ``signal_delay_s``
before the time limit; the trainer checkpoints and records ``status.json`` = preempted, and
``launch.requeue`` (run by the script after ``srun``) requeues the job. See ``launch/README.md``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from launch.cluster import ClusterConfig, load_cluster
from launch.requeue import DEFAULT_MAX_REQUEUES

LAUNCHERS = ("torchrun", "srun")
SCRIPT_NAME = "launch.sbatch"  # the submitted script, kept in the run directory
LOG_NAME = "slurm-%j.out"  # the job's stdout+stderr, in the run directory (appended across requeues)
RUN_DIR_ENV = "WORLDSMITH_RUN_DIR"
_TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}(:\d{1,2})?|\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?)$")
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")


def time_seconds(text: str) -> int:
    """Seconds of a SLURM time limit: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]]."""
    if not _TIME_RE.match(text):
        raise ValueError(f"'{text}' is not a SLURM time (MINUTES, HH:MM:SS, D-HH[:MM[:SS]])")
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


@dataclass
class LaunchSpec:
    """Everything the sbatch script needs."""

    overrides: list[str]  # Hydra overrides of the run (experiment=NAME, ...)
    run_dir: Path  # absolute; fixed for the life of the job
    job_name: str
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job
    procs_per_node: int = 1  # training processes per node
    launcher: str = "torchrun"  # "torchrun" (one per node) | "srun" (one task per process)
    time: Optional[str] = None  # sbatch --time; None: cluster.timeout_min
    # The interpreter on the compute nodes: None = `python` of the environment the cluster preset's
    # setup lines prepare (found after they ran); a path to use that one.
    python: Optional[str] = None
    nccl_debug: Optional[str] = None  # NCCL_DEBUG for this job (None: the environment's, else WARN)
    nccl_ifname: Optional[str] = None  # network interface of NCCL and gloo traffic (NCCL/GLOO_SOCKET_IFNAME)
    workdir: Path = field(default_factory=Path.cwd)  # the job's working directory (relative paths in configs)
    max_requeues: int = DEFAULT_MAX_REQUEUES
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    command_line: str = ""  # how the script was made, for its header

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node < 1:
            raise ValueError(f"--procs-per-node: must be >= 1, got {self.procs_per_node}")
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise ValueError(f"--procs-per-node {self.procs_per_node} > --gpus-per-node {self.gpus_per_node}: each process needs its own GPU")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher: '{self.launcher}' is not one of {list(LAUNCHERS)}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ValueError(f"--time: '{self.time}' is not a SLURM time (MINUTES, HH:MM:SS, D-HH[:MM[:SS]])")
        limit = time_seconds(self.time) if self.time is not None else 60 * self.cluster.timeout_min
        if limit <= self.cluster.signal_delay_s:
            given = f"--time {self.time}" if self.time is not None else f"the cluster preset's timeout_min {self.cluster.timeout_min}"
            raise ValueError(
                f"{given} ({limit} s) is not longer than signal_delay_s {self.cluster.signal_delay_s} s: SLURM would send "
                f"--signal=USR1@{self.cluster.signal_delay_s} (checkpoint and requeue) before training starts; "
                "give the job more time or lower the preset's signal_delay_s"
            )
        if self.nccl_debug is not None and self.nccl_debug not in NCCL_DEBUG_LEVELS:
            raise ValueError(f"--nccl-debug: '{self.nccl_debug}' is not one of {list(NCCL_DEBUG_LEVELS)}")
        if self.nccl_ifname is not None and not re.fullmatch(r"\^?[A-Za-z0-9_.,=-]+", self.nccl_ifname):
            raise ValueError(f"--nccl-ifname: '{self.nccl_ifname}' is not an interface name (e.g. ib0, eth0, ^docker)")
        if not self.run_dir.is_absolute():
            raise ValueError(f"run directory must be absolute, got {self.run_dir}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues: must be >= 0, got {self.max_requeues}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def tasks_per_node(self) -> int:
        """srun tasks per node: one torchrun, or one per process."""
        return 1 if self.launcher == "torchrun" else self.procs_per_node

    @property
    def cpus_per_task(self) -> Optional[int]:
        """CPUs of one srun task (the preset's ``cpus_per_task`` is per training process)."""
        per_proc = self.cluster.cpus_per_task
        return per_proc * (self.procs_per_node // self.tasks_per_node) if per_proc else None


# --------------------------------------------------------------------------------------------
# Overrides and the run directory
# --------------------------------------------------------------------------------------------


def check_overrides(overrides: list[str]) -> None:
    """Refuse what cannot work in a requeue-able single run (sweeps, other run dirs or resume points)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ValueError(f"overrides: {e}") from None
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            raise ValueError(f"override '{o.input_line}' is a sweep; run sweeps with `python -m train -m hydra/launcher=slurm ...`")
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            raise ValueError(f"override '{o.input_line}': the run directory is set by launch.slurm; use --run-dir DIR")
        if key == "checkpoint.resume" and o.value() != "latest":
            raise ValueError(
                f"override '{o.input_line}': a SLURM job always resumes from the latest checkpoint of its run directory "
                "(so that requeues continue); start from other weights with init=BUNDLE_DIR, or continue a run with --run-dir"
            )


def resolve_run(overrides: list[str]) -> tuple[str, Path]:
    """(experiment name, absolute run directory) as ``python -m train <overrides>`` would choose them now.

    Composes and validates the config with the entry point's own checks (``configs.schema.
    compose_checked``: misspelt keys, types, values), so bad overrides fail here, at submission, not
    after the job waited in the queue. With ``checkpoint.resume=latest`` the run directory is the
    newest earlier run of the same command (``train/runs.py``), or an error naming where it looked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from configs.schema import compose_checked
    from train.data import check_data_exists
    from train.runs import resume_run_dir

    cfg, obj = compose_checked(list(overrides), return_hydra_config=True)
    try:
        check_data_exists(obj.data)
    except (FileNotFoundError, ValueError) as e:  # the compute nodes may see other file systems
        print(f"launch.slurm: warning: {e} (on this machine; the job fails at start unless the nodes see it)", file=sys.stderr)
    task = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_hydra_override()]
    exclude = list(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys") or [])
    found = resume_run_dir(obj.checkpoint.resume, obj.out_root, obj.name, task, exclude)
    run_dir = found if found is not None else Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    return str(cfg.name), Path(run_dir).resolve()


# --------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------


def sbatch_options(spec: LaunchSpec) -> list[tuple[str, Optional[str]]]:
    """The ``#SBATCH`` lines as (option, value or None for a flag)."""
    c = spec.cluster
    opts: list[tuple[str, Optional[str]]] = [
        ("job-name", spec.job_name),
        ("nodes", str(spec.nodes)),
        ("ntasks-per-node", str(spec.tasks_per_node)),
    ]
    if spec.cpus_per_task:
        opts.append(("cpus-per-task", str(spec.cpus_per_task)))
    if c.gres:
        opts.append(("gres", c.gres))
    elif spec.gpus_per_node:
        opts.append(("gpus-per-node", str(spec.gpus_per_node)))
    if c.mem_gb:
        opts.append(("mem", f"{c.mem_gb}G"))
    opts.append(("time", spec.time or str(c.timeout_min)))
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        value = getattr(c, name)
        if value:
            opts.append((name, str(value)))
    opts += [
        ("output", str(spec.run_dir / LOG_NAME)),
        ("open-mode", "append"),  # requeued attempts append to the same log
        ("requeue", None),
        ("signal", f"USR1@{c.signal_delay_s}"),  # to every task (not the batch shell): checkpoint and exit 75
        ("chdir", str(spec.workdir)),
    ]
    for key, value in c.additional_parameters.items():  # {"mail-type": "END", "exclusive": true}
        if value is not None and value is not False:
            opts.append((str(key).replace("_", "-"), None if value is True else str(value)))
    return opts


def _srun_lines(spec: LaunchSpec) -> list[str]:
    """The srun command, one group of shell words per line (``$VAR`` expanded by the batch shell)."""
    srun = ["srun", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05)
        srun.append(f"--cpus-per-task={spec.cpus_per_task}")
    srun.append("--kill-on-bad-exit=1")
    # launch.task: USR1 ignored until the trainer handles it, PET_NODE_RANK from SLURM_NODEID, exit 75 -> 0
    if spec.launcher == "torchrun":
        run = [
            '"$PYTHON"', "-m", "launch.task", "torch.distributed.run",
            f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.procs_per_node}",
            '--master-addr="$MASTER_ADDR"', '--master-port="$MASTER_PORT"', "--max-restarts=0",
        ]  # fmt: skip
        train = ["-m", "launch.task", "train"]
    else:
        run = []
        train = ['"$PYTHON"', "-m", "launch.task", "train"]
    train += [shlex.quote(o) for o in spec.overrides]
    train += [shlex.quote(f"hydra.run.dir=${{oc.env:{RUN_DIR_ENV}}}"), "checkpoint.resume=latest"]
    return [" ".join(srun), *_wrap(run), *_wrap(train)]


def render_script(spec: LaunchSpec) -> str:
    """The sbatch script of ``spec``."""
    c = spec.cluster
    lines = [
        "#!/bin/bash",
        f"# Worldsmith training job, written by launch.slurm on {datetime.now():%Y-%m-%d %H:%M:%S}.",
    ]
    if spec.command_line:
        lines.append(f"#   {spec.command_line}")
    lines += [
        f"# {spec.nodes} node(s) x {spec.procs_per_node} process(es) ({spec.launcher}); run directory {spec.run_dir}",
        f"# Preemption: SIGUSR1 {c.signal_delay_s}s before the time limit (or `scancel --signal=USR1 <job>`) makes the",
        "# trainer checkpoint and write status.json = preempted; launch.requeue then requeues this job, which resumes",
        "# in the same run directory with checkpoint.resume=latest (and the same wandb run).",
    ]
    for key, value in sbatch_options(spec):
        lines.append(f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={value}")
    lines.append("")
    lines += [
        "# NCCL: a rank that fails or times out in a collective tears the job down instead of hanging it;",
        "# warnings by default (the cluster setup or --nccl-debug may change it)",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "",
    ]
    if c.setup:
        lines.append("# cluster setup")
        lines += list(c.setup)
        lines.append("")
    if spec.nccl_debug:
        lines.append(f"export NCCL_DEBUG={spec.nccl_debug}  # --nccl-debug")
    if spec.nccl_ifname:
        lines.append(f"export NCCL_SOCKET_IFNAME={shlex.quote(spec.nccl_ifname)} GLOO_SOCKET_IFNAME={shlex.quote(spec.nccl_ifname)}  # --nccl-ifname")
    if spec.python:
        lines.append(f"PYTHON={shlex.quote(spec.python)}  # --python")
    else:
        lines.append('PYTHON="$(command -v python || command -v python3)"  # the environment the cluster setup prepared')
    lines += [
        'if ! "$PYTHON" -c "import launch.task" 2>/dev/null; then',
        '  echo "[worldsmith] python \'$PYTHON\' cannot import worldsmith: the cluster preset\'s setup must activate its environment (or pass --python)" >&2',
        "  exit 2",
        "fi",
        f"export {RUN_DIR_ENV}={shlex.quote(str(spec.run_dir))}",
        "export PYTHONUNBUFFERED=1",
    ]
    if c.cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS={c.cpus_per_task}")
    lines += [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "",
        'echo "[worldsmith] job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST;'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT; run directory $' + RUN_DIR_ENV + '"',
        f'rm -f "${RUN_DIR_ENV}/status.json"  # this attempt writes its own; a stale one must not requeue it',
        "",
        " \\\n    ".join(_srun_lines(spec)),
        "rc=$?",
        "",
        "# preempted (status.json says so): requeue; otherwise end with the training's exit code",
        f'exec "$PYTHON" -m launch.requeue --run-dir "${RUN_DIR_ENV}" --exit-code "$rc" --max-requeues {spec.max_requeues}',
        "",
    ]
    return "\n".join(lines)


def _wrap(words: list[str], width: int = 100) -> list[str]:
    """Group shell words into lines of about ``width`` characters."""
    out, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    return out


# --------------------------------------------------------------------------------------------
# Submission and the CLI
# --------------------------------------------------------------------------------------------


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: run this on a SLURM login node (or see launch/README.md for a local SLURM)") from None
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Write and submit the sbatch script of one training run (Hydra overrides as positionals).",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of python -m train, e.g. experiment=demo optim.lr=3e-4")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: the preset's gpus_per_node or gres; one of them is required; 0 = a CPU job)")
    ap.add_argument("--procs-per-node", type=int, default=None, help="training processes per node (default: GPUs per node, at least 1)")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="torchrun: one torchrun per node (default); srun: one task per process")
    ap.add_argument("--cluster", default=None, help="preset name in configs/cluster/ or a .yaml path (default: $WORLDSMITH_CLUSTER or 'default')")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--time", default=None, help="time limit (MINUTES, HH:MM:SS, D-HH:MM); default: the preset's timeout_min")
    ap.add_argument("--job-name", default=None, help="default: ws-<experiment name>")
    ap.add_argument("--run-dir", default=None, help="run directory (default: outputs/<name>/<time>_<slug>_<id>); an existing run continues")
    ap.add_argument("--python", default=None,
                    help="python on the compute nodes (default: `python` of the environment the preset's setup lines activate; "
                         "without setup lines, this interpreter)")
    ap.add_argument("--nccl-debug", default=None, choices=NCCL_DEBUG_LEVELS, help="NCCL_DEBUG of the job (default: WARN)")
    ap.add_argument("--nccl-ifname", default=None, help="network interface for NCCL and gloo (NCCL_SOCKET_IFNAME), e.g. ib0")
    ap.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES, help=f"requeues after preemption before giving up (default {DEFAULT_MAX_REQUEUES})")
    ap.add_argument("--dry-run", action="store_true", help="print the script; create and submit nothing")
    return ap.parse_intermixed_args(argv)  # overrides and options in any order


def build_spec(args: argparse.Namespace, command_line: str = "") -> LaunchSpec:
    """A :class:`LaunchSpec` from parsed arguments (composes the config to name the run directory)."""
    check_overrides(args.overrides)
    experiment_name, default_dir = resolve_run(args.overrides)
    cluster = load_cluster(args.cluster)
    for name in ("partition", "account", "qos"):
        if getattr(args, name) is not None:
            setattr(cluster, name, getattr(args, name))
    gpus = args.gpus_per_node if args.gpus_per_node is not None else cluster.gpus_per_node
    if gpus is None and cluster.gres:
        m = re.fullmatch(r"gpu(?::[^:,]+)?:(\d+)", cluster.gres)
        gpus = int(m.group(1)) if m else None
    if gpus is None:
        raise ValueError(
            f"no GPU request: neither --gpus-per-node nor the cluster preset '{args.cluster or 'default'}' "
            "(gpus_per_node, gres) says how many GPUs a node needs; pass --gpus-per-node N, or --gpus-per-node 0 for a CPU job"
        )
    procs = args.procs_per_node if args.procs_per_node is not None else max(gpus, 1)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_dir
    return LaunchSpec(
        overrides=list(args.overrides),
        run_dir=run_dir,
        job_name=args.job_name or f"ws-{experiment_name}",
        nodes=args.nodes,
        gpus_per_node=gpus,
        procs_per_node=procs,
        launcher=args.launcher,
        time=args.time,
        python=args.python if args.python is not None else (None if cluster.setup else sys.executable),
        nccl_debug=args.nccl_debug,
        nccl_ifname=args.nccl_ifname,
        max_requeues=args.max_requeues,
        cluster=cluster,
        command_line=command_line,
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        spec = build_spec(args, "python -m launch.slurm " + " ".join(shlex.quote(a) for a in argv))
    except (ValueError, FileNotFoundError) as e:  # ConfigError and RunNotFoundError among them
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra / OmegaConf composition errors name the bad override or key
        if not type(e).__module__.startswith(("hydra", "omegaconf")):
            raise
        print(f"launch.slurm: the config does not compose: {e}", file=sys.stderr)
        return 2
    script = render_script(spec)
    if args.dry_run:
        print(script, end="")
        return 0
    created = None  # the outermost directory this call creates (removed again if sbatch fails)
    for d in (spec.run_dir, *spec.run_dir.parents):
        if d.exists():
            break
        created = d
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    path = spec.run_dir / SCRIPT_NAME
    path.write_text(script)
    try:
        job = submit(path)
    except RuntimeError as e:  # nothing was queued: leave nothing behind
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job}: {spec.nodes} node(s) x {spec.procs_per_node} process(es)")
    print(f"  run directory {spec.run_dir}")
    print(f"  log           {spec.run_dir / LOG_NAME.replace('%j', job)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
