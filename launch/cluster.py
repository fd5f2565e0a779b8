"""Cluster presets: a lab's SLURM settings, written once in ``configs/cluster/<name>.yaml``.

The field names are hydra-submitit-launcher's, so one preset file serves both the sbatch writer
(``python -m launch.slurm --cluster NAME``) and Hydra sweeps (``hydra/launcher=slurm``, which merges
the preset into ``hydra.launcher``). A misspelt key fails with its name and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs import CONFIG_DIR

CLUSTER_DIR = Path(CONFIG_DIR) / "cluster"
CLUSTER_ENV = "WORLDSMITH_CLUSTER"  # the preset used when --cluster is not given


@dataclass
class ClusterConfig:
    """Where and how jobs run. ``None`` leaves a setting to the cluster's defaults."""

    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    constraint: Optional[str] = None  # sbatch --constraint (node features, e.g. "h100")
    exclude: Optional[str] = None  # sbatch --exclude (nodes to avoid)
    gres: Optional[str] = None  # sbatch --gres, for clusters that want "gpu:8" instead of --gpus-per-node
    gpus_per_node: Optional[int] = None  # GPUs per node (default of --gpus-per-node)
    cpus_per_task: Optional[int] = None  # CPUs per training process (also its OMP_NUM_THREADS)
    mem_gb: Optional[int] = None  # memory per node, GB
    timeout_min: int = 60  # time limit in minutes (jobs requeue themselves past it, see launch/README.md)
    signal_delay_s: int = 120  # SIGUSR1 this many seconds before the time limit: checkpoint, then requeue
    setup: list[str] = field(default_factory=list)  # shell lines run before training (module load, venv, exports)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options: {"mail-type": "END"}

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "cpus_per_task", "mem_gb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"cluster.{name}: must be >= 0, got {value}")
        if self.timeout_min <= 0:
            raise ValueError(f"cluster.timeout_min: must be > 0, got {self.timeout_min}")
        if self.signal_delay_s < 0:
            raise ValueError(f"cluster.signal_delay_s: must be >= 0, got {self.signal_delay_s}")


def cluster_path(name_or_path: str) -> Path:
    """``configs/cluster/<name>.yaml``, or ``name_or_path`` itself when it is a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"cluster preset {p}: no such file")
        return p
    path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in CLUSTER_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"cluster preset '{name_or_path}': no {path}; presets: {known} (or pass a .yaml path)")
    return path


def load_cluster(name_or_path: Optional[str] = None) -> ClusterConfig:
    """The preset named (or at the path) ``name_or_path``; default ``$WORLDSMITH_CLUSTER`` or ``default``."""
    path = cluster_path(name_or_path or os.environ.get(CLUSTER_ENV) or "default")
    try:
        data = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), data if data is not None else {})
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        raise ValueError(f"cluster preset {path}: {e}") from None
    assert isinstance(cfg, ClusterConfig)
    return cfg
