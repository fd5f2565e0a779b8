"""SLURM launching: the sbatch script, cluster presets, requeue decisions, the task wrapper, and,
against a real single-node SLURM (``launch.minicluster``, tests marked ``slurm``):

- a job submitted with the generated script (2 tasks, gloo) trains to the end and exports a bundle;
- a job signalled with USR1 mid-run checkpoints, requeues, resumes (same run directory, same wandb
  run) and ends with exactly the losses of the uninterrupted job;
- a 2-point Hydra sweep through the submitit launcher runs each point as a SLURM job in a directory
  named by its overrides, and a point signalled with USR1 requeues and resumes.

The fixture installs ``slurm-wlm`` and ``munge`` with apt when they are missing and it runs as root;
elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.cluster import ClusterConfig, load_cluster
from launch.requeue import after_attempt, decide, job_id
from launch.slurm import LaunchSpec, main as slurm_main, render_script, sbatch_options
from launch.sweep import with_resume
from train.signals import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "slurm"
TEST_PRESET = FIXTURES / "cluster" / "localtest.yaml"
SEARCHPATH = f"hydra.searchpath=[file://{FIXTURES}]"
PY = sys.executable
JOB_TIMEOUT = 420  # seconds; the machine may be shared


# ------------------------------------------------------------------------------------------------
# The sbatch script
# ------------------------------------------------------------------------------------------------


def _spec(tmp_path: Path, **kw) -> LaunchSpec:
    base = dict(overrides=["experiment=demo", "optim.lr=3e-4"], run_dir=tmp_path / "run", job_name="ws-demo", workdir=tmp_path, python="/opt/venv/bin/python")
    base.update(kw)
    return LaunchSpec(**base)


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_script_torchrun_per_node(tmp_path):
    cluster = load_cluster("example")
    spec = _spec(tmp_path, nodes=4, gpus_per_node=8, procs_per_node=8, cluster=cluster, time="2-00:00:00")
    script = render_script(spec)
    _bash_syntax_ok(script, tmp_path)
    opts = dict(sbatch_options(spec))
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "1"  # one torchrun per node
    assert opts["cpus-per-task"] == str(8 * cluster.cpus_per_task)  # the preset's CPUs are per process
    assert opts["gpus-per-node"] == "8" and opts["mem"] == f"{cluster.mem_gb}G" and opts["time"] == "2-00:00:00"
    assert opts["partition"] == "gpu" and opts["account"] == "my-lab" and opts["qos"] == "normal" and opts["constraint"] == "h100"
    assert opts["signal"] == "USR1@120" and "requeue" in opts and opts["requeue"] is None and opts["open-mode"] == "append"
    assert opts["output"] == str(spec.run_dir / "slurm-%j.out") and opts["chdir"] == str(tmp_path)
    assert opts["mail-type"] == "FAIL"  # additional_parameters
    for line in cluster.setup:  # the lab's setup runs before training
        assert line in script
    assert script.index(cluster.setup[0]) < script.index("srun ")
    # rendezvous from SLURM's environment: first host of the nodelist, a port from the job id
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    srun = script[script.index("srun "):script.index("rc=$?")].replace("\\\n", " ")
    assert "--nodes=4 --ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert "-m launch.task torch.distributed.run --nnodes=4 --nproc-per-node=8" in " ".join(srun.split())
    assert '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"' in srun
    # fixed run directory and resume: a requeued attempt continues where the last one stopped
    assert f"export WORLDSMITH_RUN_DIR={spec.run_dir}" in script
    assert "'hydra.run.dir=${oc.env:WORLDSMITH_RUN_DIR}' checkpoint.resume=latest" in " ".join(srun.split())
    assert "experiment=demo optim.lr=3e-4" in srun
    assert script.rstrip().endswith('--exit-code "$rc" --max-requeues 100')


def test_script_srun_tasks_and_cpu_job(tmp_path):
    spec = _spec(tmp_path, nodes=1, gpus_per_node=0, procs_per_node=2, launcher="srun", cluster=load_cluster(str(TEST_PRESET)))
    script = render_script(spec)
    _bash_syntax_ok(script, tmp_path)
    opts = dict(sbatch_options(spec))
    assert opts["ntasks-per-node"] == "2" and opts["cpus-per-task"] == "1" and "gpus-per-node" not in opts
    assert opts["time"] == "10" and opts["signal"] == "USR1@60" and opts["partition"] == "debug"
    assert "torch.distributed.run" not in script and '"$PYTHON" -m launch.task train' in script
    assert "export OMP_NUM_THREADS=1" in script


def test_spec_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="--time"):
        _spec(tmp_path, time="two days")
    with pytest.raises(ValueError, match="--launcher"):
        _spec(tmp_path, launcher="mpirun")
    with pytest.raises(ValueError, match="--nodes"):
        _spec(tmp_path, nodes=0)
    with pytest.raises(ValueError, match="its own GPU"):
        _spec(tmp_path, gpus_per_node=4, procs_per_node=8)
    with pytest.raises(ValueError, match="absolute"):
        _spec(tmp_path, run_dir=Path("relative/run"))


def test_cli_dry_run_names_the_run_and_refuses_what_cannot_requeue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert slurm_main(["experiment=demo", "--nodes", "2", "--gpus-per-node", "8", "optim.lr=0.1", "--cluster", "example", "--dry-run"]) == 0
    script = capsys.readouterr().out
    run_dir = re.search(r"^export WORLDSMITH_RUN_DIR=(.+)$", script, re.M).group(1)
    # named as `python -m train` names it: outputs/<experiment name>/<time>_<slug>_<id>
    assert re.fullmatch(re.escape(str(tmp_path / "outputs" / "demo")) + r"/\d{8}-\d{6}_lr-0\.1_[0-9a-f]{8}", run_dir), run_dir
    assert "#SBATCH --job-name=ws-demo" in script and "#SBATCH --partition=gpu" in script
    assert not (tmp_path / "outputs").exists()  # a dry run creates nothing

    cases = [
        (["experiment=demo", "optim.lr=0.1,0.2"], "is a sweep"),
        (["experiment=demo", "checkpoint.resume=/some/ckpt"], "init=BUNDLE_DIR"),
        (["experiment=demo", "hydra.run.dir=/x"], "--run-dir"),
        (["experiment=demo", "optim.lrr=0.1"], "optim.lrr"),  # composed at submission: typos fail now
        (["experiment=demo", "--cluster", "nosuchlab"], "nosuchlab"),
    ]
    for argv, message in cases:
        assert slurm_main([*argv, "--dry-run"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_cli_checks_gpus_time_environment_and_a_failed_sbatch_upfront(tmp_path, monkeypatch, capsys):
    """Issue 15.6: no silent CPU job, the preset's environment, time vs signal, a failed sbatch leaves nothing."""
    monkeypatch.chdir(tmp_path)
    # neither --gpus-per-node nor the preset says how many GPUs: an error, not a CPU job
    assert slurm_main(["experiment=demo", "--nodes", "2", "--dry-run"]) == 2
    assert "--gpus-per-node" in capsys.readouterr().err
    assert slurm_main(["experiment=demo", "--gpus-per-node", "0", "--dry-run"]) == 0  # a CPU job, asked for
    cpu = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node" not in cpu and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in cpu and 'NCCL_DEBUG="${NCCL_DEBUG:-WARN}"' in cpu
    # the interpreter is the one the preset's setup activates, found after the setup ran
    assert slurm_main(["experiment=demo", "--cluster", "example", "--nccl-debug", "INFO", "--nccl-ifname", "ib0", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert sys.executable not in script and 'PYTHON="$(command -v python || command -v python3)"' in script
    assert script.index("source $HOME/worldsmith/.venv/bin/activate") < script.index("PYTHON=") < script.index("srun ")
    assert "export NCCL_DEBUG=INFO" in script and "NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0" in script
    assert script.index("export NCCL_DEBUG=INFO") > script.index("module load")  # the flag wins over the setup
    _bash_syntax_ok(script, tmp_path)
    # a time limit the preemption signal would precede
    assert slurm_main(["experiment=demo", "--cluster", "example", "--time", "1", "--dry-run"]) == 2
    assert "signal_delay_s 120" in capsys.readouterr().err
    # a failed sbatch: a message, no traceback, no run directory
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert slurm_main(["experiment=demo", "--cluster", "example"]) == 1
    assert "invalid partition" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------------------------
# Cluster presets and Hydra launcher presets
# ------------------------------------------------------------------------------------------------


def test_cluster_presets(tmp_path, monkeypatch):
    example = load_cluster("example")
    assert (example.partition, example.gpus_per_node, example.mem_gb) == ("gpu", 8, 960)
    assert example.setup[0].startswith("module load")
    bad = tmp_path / "lab.yaml"
    bad.write_text("partition: gpu\npartiton: typo\n")
    with pytest.raises(ValueError, match=r"lab\.yaml.*partiton"):
        load_cluster(str(bad))
    bad.write_text("gpus_per_node: -1\n")
    with pytest.raises(ValueError, match="gpus_per_node"):
        load_cluster(str(bad))
    with pytest.raises(FileNotFoundError, match="example"):  # lists the presets there are
        load_cluster("nosuchlab")
    monkeypatch.setenv("WORLDSMITH_CLUSTER", str(TEST_PRESET))
    assert load_cluster().partition == "debug"


def _compose(overrides: list[str]):
    import importlib

    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR

    importlib.import_module("train.__main__")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_hydra_launcher_presets_take_the_cluster_preset():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = _compose(["hydra/launcher=slurm", "cluster@hydra.launcher=example", "experiment=demo", "optim.lr=0.1"])
    assert cfg.hydra.job.override_dirname == "optim.lr=0.1"  # the cluster is not part of a point's name
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", "my-lab", 8, 2880)
    assert list(launcher.setup)[0].startswith("module load") and launcher.additional_parameters["mail-type"] == "FAIL"
    assert launcher.additional_parameters["requeue"] is True and launcher.name == "ws-demo"
    assert cfg.hydra.callbacks.requeue_on_preemption._target_ == "launch.sweep.RequeueOnPreemption"
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"].startswith("${hydra.job.num}${ws_point_name:")  # named by the swept overrides
    # one preset file serves both paths: every ClusterConfig field is a submitit launcher field
    import dataclasses

    assert {f.name for f in dataclasses.fields(ClusterConfig)} <= {f.name for f in dataclasses.fields(SlurmQueueConf)}
    local = _compose(["hydra/launcher=local", "experiment=demo"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.gpus_per_node == 0


# ------------------------------------------------------------------------------------------------
# Requeue decisions and the task wrapper
# ------------------------------------------------------------------------------------------------


def test_requeue_decisions(tmp_path, monkeypatch):
    assert decide({"status": "preempted", "step": 7}, 0, 0, 3)[0]
    assert decide(None, PREEMPTED_EXIT_CODE, 0, 3)[0]  # a single process that exited 75
    assert not decide({"status": "completed"}, 0, 0, 3)[0]
    assert not decide({"status": "failed"}, 1, 0, 3)[0]
    assert not decide(None, 137, 0, 3)[0]  # killed: no checkpoint promise, no requeue
    ok, why = decide({"status": "preempted", "step": 7}, 0, 3, 3)
    assert not ok and "3 times" in why
    assert job_id({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2"}) == "10_2"
    assert with_resume(["a=1"]) == ["a=1", "checkpoint.resume=latest"] and with_resume(["checkpoint.resume=x"]) == ["checkpoint.resume=x"]

    # after_attempt against a stand-in scontrol that records its arguments
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    run.mkdir()
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}
    (run / "status.json").write_text(json.dumps({"status": "preempted", "step": 5, "signal": "SIGUSR1"}))
    assert after_attempt(run, 1, 100, env) == 0 and calls.read_text().split() == ["requeue", "4242"]
    assert after_attempt(run, 1, 1, env) == 1  # out of requeues: ends with the step's exit code
    (run / "status.json").write_text(json.dumps({"status": "completed", "step": 40}))
    assert after_attempt(run, 0, 100, env) == 0
    (run / "status.json").write_text(json.dumps({"status": "failed", "step": 3}))
    assert after_attempt(run, 0, 100, env) == 1 and after_attempt(run, 3, 100, env) == 3
    assert calls.read_text().split() == ["requeue", "4242"]  # only the preempted attempt requeued


def test_task_wrapper(tmp_path):
    mod = tmp_path / "fake_trainer.py"
    mod.write_text(
        "import os, signal, sys\n"
        "os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's signal before the trainer handles it: ignored\n"
        "print('alive', os.environ.get('PET_NODE_RANK'), sys.argv[1:])\n"
        "raise SystemExit(int(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SLURM_NODEID": "3"}
    for code, expect in ((PREEMPTED_EXIT_CODE, 0), (3, 3), (0, 0)):
        done = subprocess.run([PY, "-m", "launch.task", "fake_trainer", str(code)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == expect, done.stderr
        assert f"alive 3 ['{code}']" in done.stdout


def test_minicluster_config_and_install_refusals(tmp_path, monkeypatch):
    import launch.minicluster as mc

    conf = mc.slurm_conf(tmp_path, cpus=6, ctld_port=7001, slurmd_port=7002, first_job_id=1234)
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SlurmctldPort=7001", "FirstJobId=1234",
                 f"AuthInfo=socket={tmp_path}/munge/munge.sock,cred_expire=10", "NodeName=localhost NodeAddr=127.0.0.1 CPUs=6"):
        assert line in conf.splitlines() or any(ln.startswith(line) for ln in conf.splitlines()), line
    monkeypatch.setattr(mc, "_which", lambda name: None)  # nothing installed
    monkeypatch.setattr(mc.os, "geteuid", lambda: 1000)
    assert "needs root" in mc.ensure_installed(install=True)
    monkeypatch.setattr(mc.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mc.shutil, "which", lambda name, **kw: None)  # no apt-get
    assert "no apt-get" in mc.ensure_installed(install=True)
    assert "missing" in mc.ensure_installed(install=False)


# ------------------------------------------------------------------------------------------------
# A real SLURM
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from launch.minicluster import MiniCluster, ensure_installed

    reason = ensure_installed(install=True)
    if reason:
        pytest.skip(f"no local SLURM: {reason}. To enable: run the tests as root on a machine with apt-get (the fixture installs "
                    "slurm-wlm and munge), or install them first with `sudo make slurm-local`")
    c = MiniCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The jobs' working directory, with the tiny experiment's data in ./data."""
    from data.actions import MotionSteps, keys_to_poses
    from data.geometry import make_intrinsics
    from data.poseio import parse_pose_string
    from data.shards import ShardWriter

    root = tmp_path_factory.mktemp("work")
    rng = np.random.default_rng(0)
    keys = parse_pose_string("w-12, right-8, d-12")
    F = keys.shape[0]
    c2w = keys_to_poses(keys, MotionSteps(0.02, 0.75)).float().numpy()
    K = np.repeat(make_intrinsics(60, 32, 32).numpy()[None], F, 0)
    with ShardWriter(root / "data", samples_per_shard=4) as w:
        for _ in range(8):
            w.write({"video": rng.integers(0, 255, (F, 32, 32, 3), dtype=np.uint8), "c2w": c2w, "K": K, "keys": keys.numpy(), "caption": "", "meta": {"source": "test"}})
    return root


def submit(cluster, workdir: Path, run_name: str, *flags: str) -> tuple[str, Path]:
    """``python -m launch.slurm`` the tiny experiment; returns (job id, run directory)."""
    run_dir = workdir / "runs" / run_name
    cmd = [PY, "-m", "launch.slurm", SEARCHPATH, "experiment=slurm_tiny", "--cluster", str(TEST_PRESET), "--gpus-per-node", "0",
           "--run-dir", str(run_dir), *flags]
    done = subprocess.run(cmd, cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    job = re.search(r"submitted job (\d+):", done.stdout).group(1)
    assert (run_dir / "launch.sbatch").is_file()
    return job, run_dir


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss/student"] for r in rows if "loss/student" in r}


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def while_running(cluster, job: str, log: Path, predicate):
    """``predicate``, failing at once (with the log) if job ``job`` has ended instead."""

    def check() -> bool:
        if predicate():
            return True
        state = cluster.job(job).get("JobState")
        if state in ENDED:
            text = log.read_text()[-4000:] if log.is_file() else f"(no {log})"
            raise AssertionError(f"job {job} ended ({state}) early:\n{text}")
        return False

    return check


def reached_step(metrics: Path, step: int) -> bool:
    try:
        return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.strip())
    except (OSError, json.JSONDecodeError):
        return False


def log_of(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def finished_job(cluster, workdir):
    """The uninterrupted job: 2 srun tasks (ranks from SLURM's variables, no torchrun), DDP over gloo."""
    job, run_dir = submit(cluster, workdir, "uninterrupted", "--launcher", "srun", "--procs-per-node", "2")
    info = cluster.wait_job(job, JOB_TIMEOUT)
    return job, run_dir, info


@pytest.mark.slurm
def test_job_trains_to_the_end_and_exports(finished_job):
    job, run_dir, info = finished_job
    log = log_of(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    steps = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["steps"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == steps
    marker = json.loads((run_dir / "ckpt" / f"step_{steps:06d}" / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and (run_dir / "ckpt" / f"step_{steps:06d}" / "rank_00001.pt").is_file()  # two ranks trained
    bundle = run_dir / "export" / "bundle"
    assert all((bundle / f).is_file() for f in ("model.safetensors", "config.yaml", "meta.json"))
    assert json.loads((bundle / "meta.json").read_text())["step"] == steps
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert "[worldsmith] not requeued: status completed" in log and info["Restarts"] == "0"


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_one(cluster, workdir, finished_job):
    _, ref_dir, _ = finished_job
    reference = losses(ref_dir)
    # the default launcher (one torchrun per node), 2 processes; wandb offline, to see the run continue
    job, run_dir = submit(cluster, workdir, "preempted", "--procs-per-node", "2", "logger.wandb=true")
    log_path = run_dir / f"slurm-{job}.out"
    wait_for(while_running(cluster, job, log_path, lambda: reached_step(run_dir / "metrics.jsonl", 2)), JOB_TIMEOUT, "training step 2")
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@<s> sends before the time limit
    wait_for(while_running(cluster, job, log_path, lambda: "requeued;" in log_of(run_dir, job)), JOB_TIMEOUT, "requeue")
    first_wandb_id = (run_dir / "wandb_run_id").read_text()
    info = cluster.wait_job(job, JOB_TIMEOUT)
    log = log_of(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-3000:]

    stopped = int(re.search(r"preempted \(SIGUSR1\) at step (\d+): checkpoint saved", log).group(1))
    assert 2 <= stopped < max(reference), f"signal arrived too late (step {stopped}): the run was not interrupted"
    assert re.search(rf"resumed from {re.escape(str(run_dir))}/ckpt/step_{stopped:06d} at step {stopped}", log)
    assert "attempt 2 on localhost" in log and json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    # exact resume: every step's loss, the last one included, equals the uninterrupted job's
    got = losses(run_dir)
    assert got == reference
    # the same wandb run continues: one id, one offline run directory per attempt
    assert (run_dir / "wandb_run_id").read_text() == first_wandb_id
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(first_wandb_id) for r in runs), runs


@pytest.mark.slurm
def test_hydra_sweep_runs_each_point_as_a_job_and_requeues_a_preempted_one(cluster, workdir):
    sweep_dir = workdir / "sweep"
    cmd = [PY, "-m", "train", "-m", "hydra/launcher=slurm", SEARCHPATH, "cluster@hydra.launcher=localtest", "experiment=slurm_tiny",
           "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    out = open(workdir / "sweep.log", "w")
    proc = subprocess.Popen(cmd, cwd=workdir, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        points = [sweep_dir / "0_lr-0.001", sweep_dir / "1_lr-0.002"]  # <num>_<swept overrides>
        def point0_at_step2() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the sweep ended early ({proc.returncode}):\n{(workdir / 'sweep.log').read_text()[-4000:]}")
            return reached_step(points[0] / "metrics.jsonl", 2)

        wait_for(point0_at_step2, JOB_TIMEOUT, "point 0 at step 2")
        tasks = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        task0 = next(t for t in tasks if t.endswith("_0"))
        cluster.run("scancel", "--signal=USR1", task0)
        proc.wait(timeout=JOB_TIMEOUT)  # `python -m train -m` waits for every point's result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        out.close()
    assert proc.returncode == 0, (workdir / "sweep.log").read_text()[-3000:]
    for point, lr in zip(points, (1e-3, 2e-3)):
        assert json.loads((point / "status.json").read_text())["status"] == "completed", point
        assert yaml.safe_load((point / "config.yaml").read_text())["optim"]["lr"] == lr
        assert (point / "export" / "bundle" / "model.safetensors").is_file()
    array_id = task0.split("_")[0]
    log0 = (sweep_dir / ".submitit" / task0 / f"{task0}_0_log.out").read_text()
    stopped = int(re.search(r"preempted \(SIGUSR1\) at step (\d+)", log0).group(1))
    assert "the rerun gets checkpoint.resume=latest" in log0 and f"job {task0} requeued" in log0
    assert f"resumed from {points[0]}/ckpt/step_{stopped:06d} at step {stopped}" in log0
    assert cluster.job(f"{array_id}_0").get("Restarts") == "1" and cluster.job(f"{array_id}_1").get("Restarts") == "0"
    assert "preempted" not in (sweep_dir / ".submitit" / f"{array_id}_1" / f"{array_id}_1_0_log.out").read_text()
