"""A single-node SLURM on localhost: for the tests, and for trying the launcher on a workstation.

Everything lives in one directory (``slurm.conf``, munge key and socket, state, spool, logs), the
daemons listen on free ports, and commands find the cluster through ``SLURM_CONF``; nothing in
``/etc`` is touched, so several can run side by side. Needs Debian's ``slurm-wlm`` and ``munge``
(:func:`ensure_installed` installs them with apt when run as root) and root, because ``slurmd``
starts jobs as their user.

    python -m launch.minicluster install            # apt-get install slurm-wlm munge (root)
    python -m launch.minicluster start DIR [--cpus N]   # prints `export SLURM_CONF=DIR/slurm.conf`
    python -m launch.minicluster stop DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
NODE = "localhost"
PARTITION = "debug"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> Optional[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def missing_programs() -> list[str]:
    """SLURM / munge programs not installed here."""
    return [p for p in (*DAEMONS, *CLIENTS) if _which(p) is None]


def ensure_installed(install: bool = True) -> Optional[str]:
    """None when SLURM and munge are usable here (installing them with apt if allowed); else why not."""
    missing = missing_programs()
    if missing and install:
        if os.geteuid() != 0:
            return f"SLURM programs {missing} are missing and installing them needs root (apt-get install {' '.join(PACKAGES)})"
        if shutil.which("apt-get") is None:
            return f"SLURM programs {missing} are missing and there is no apt-get to install {' '.join(PACKAGES)}"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *PACKAGES]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # stale or absent package lists: refresh once
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}"
        missing = missing_programs()
    if missing:
        return f"SLURM programs {missing} are missing (apt-get install {' '.join(PACKAGES)})"
    if os.geteuid() != 0:
        return "a local SLURM must run as root (slurmd starts jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int, first_job_id: int) -> str:
    """A minimal ``slurm.conf``: one node with ``cpus`` CPUs, no cgroups, no accounting."""
    host = socket.gethostname().split(".")[0]
    return f"""\
# Written by launch.minicluster: a single-node SLURM on localhost ({root}).
ClusterName=worldsmith
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId={first_job_id}
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


class MiniCluster:
    """A local SLURM rooted at ``root``; :meth:`start` it, run jobs with :attr:`env`, :meth:`stop` it."""

    def __init__(self, root: str | Path, cpus: Optional[int] = None):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands (and jobs submitted from it)."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def _pids_file(self) -> Path:
        return self.root / "run" / "pids.json"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done

    # --- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "MiniCluster":
        """Write the config, start munged, slurmctld and slurmd, wait until the node is idle."""
        reason = ensure_installed(install=False)
        if reason:
            raise RuntimeError(f"launch.minicluster: {reason}")
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munge clients must reach the socket
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, slurmd_port = _free_port(), _free_port()
        first_job_id = 1000 + (ctld_port * 7) % 18000  # distinct job ids (and MASTER_PORTs) across clusters
        self.conf.write_text(slurm_conf(self.root, self.cpus, ctld_port, slurmd_port, first_job_id))
        m = self.root / "munge"
        commands = {
            "munged": [_which("munged"), "-F", "--force", f"--socket={m}/munge.sock", f"--key-file={key}",
                       f"--pid-file={m}/munged.pid", f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"],
            "slurmctld": [_which("slurmctld"), "-D", "-f", str(self.conf)],
            "slurmd": [_which("slurmd"), "-D", "-f", str(self.conf), "-N", NODE],
        }  # fmt: skip
        pids: dict[str, int] = {}
        try:
            for name, cmd in commands.items():
                out = open(self.root / "log" / f"{name}.out", "ab")
                proc = subprocess.Popen([str(c) for c in cmd], env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                pids[name] = proc.pid
                self._pids_file().write_text(json.dumps(pids))
                if name == "munged":
                    self._wait(lambda: (m / "munge.sock").exists(), 20, "munged socket")
            self._wait(self._node_ready, timeout, f"node {NODE} idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_ready(self) -> bool:
        done = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False, timeout=10)
        return done.returncode == 0 and done.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            self._check_alive()
            time.sleep(0.5)
        raise TimeoutError(f"launch.minicluster: no {what} after {timeout:.0f}s; logs in {self.root / 'log'}")

    def _check_alive(self) -> None:
        for name, pid in self._read_pids().items():
            if not _alive(pid):
                log = self.root / "log" / f"{name}.out"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise RuntimeError(f"launch.minicluster: {name} exited; {log}:\n{tail}")

    def _read_pids(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self._pids_file().read_text()).items()}
        except (OSError, ValueError):
            return {}

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (the ones this directory started)."""
        pids = self._read_pids()
        if pids.get("slurmctld") and _alive(pids["slurmctld"]):
            self.run("scancel", "--full", "--partition", PARTITION, check=False, timeout=20)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                done = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                end = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < end:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self._pids_file().unlink(missing_ok=True)

    def __enter__(self) -> "MiniCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- jobs ------------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot it."""
        done = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=20)
        if done.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until job ``job_id`` has ended (COMPLETED, FAILED, ...); returns its record."""
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.minicluster", description="a single-node SLURM on localhost")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help=f"apt-get install {' '.join(PACKAGES)} (root)")
    p = sub.add_parser("start", help="start a cluster rooted at DIR")
    p.add_argument("dir")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: this machine's)")
    p = sub.add_parser("stop", help="cancel its jobs and stop the cluster rooted at DIR")
    p.add_argument("dir")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        reason = ensure_installed(install=True)
        print(reason or "SLURM and munge are installed")
        return 1 if reason else 0
    cluster = MiniCluster(args.dir, getattr(args, "cpus", None))
    if args.cmd == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
