"""The typed configuration tree: one dataclass per group, registered with Hydra's ConfigStore.

The primary config (``configs/config.yaml``) starts from the ``schema`` node (:class:`Config`).
Every group option is a structured node, so a misspelt key anywhere (``optim.lrr=1``) fails with
the key's name. Experiments (``configs/experiment/*.yaml``) are plain override files on top.
Groups: model, autoencoder, text_encoder, data, stage, optim, schedule, dist, logger, checkpoint,
trainer, sampling, lora, experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from models.autoencoders import AutoencoderConfig
from models.config import WorldDiTConfig, preset
from models.rollout import RolloutConfig
from models.text_encoders import TextEncoderConfig
from train.config import CheckpointConfig, DistConfig, LoggerConfig, OptimConfig, ScheduleConfig, TrainerConfig
from train.data import DataConfig
from train.lora import LoraConfig
from train.stages import STAGE_CONFIGS

@dataclass
class Config:
    """A whole run. ``name`` and the overrides name its output directory."""

    name: str = "default"  # experiment name (set by each experiment file)
    out_root: str = "outputs"  # runs land in out_root/name/<time>_<overrides>
    init: Optional[str] = None  # a parent bundle directory to start from (its weights, lineage in meta)
    model: WorldDiTConfig = MISSING
    autoencoder: AutoencoderConfig = MISSING
    text_encoder: TextEncoderConfig = MISSING
    data: DataConfig = MISSING
    stage: Any = MISSING  # one of train.stages.STAGE_CONFIGS, typed by the chosen group option
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dist: DistConfig = MISSING
    logger: LoggerConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: RolloutConfig = field(default_factory=RolloutConfig)  # exported as the bundle's defaults
    lora: LoraConfig = field(default_factory=LoraConfig)


def register_configs() -> None:
    """Populate the ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name in ("tiny", "small", "base", "hy15"):
        cs.store(group="model", name=name, node=preset(name))
    cs.store(group="autoencoder", name="patch", node=AutoencoderConfig(kind="patch"))
    cs.store(group="autoencoder", name="hunyuan15", node=AutoencoderConfig(kind="hunyuan15"))
    cs.store(group="autoencoder", name="wan", node=AutoencoderConfig(kind="wan"))
    cs.store(group="text_encoder", name="none", node=TextEncoderConfig(kind="none"))
    cs.store(group="text_encoder", name="hf", node=TextEncoderConfig(kind="hf"))
    cs.store(group="text_encoder", name="precomputed", node=TextEncoderConfig(kind="precomputed"))
    cs.store(group="data", name="synthetic", node=DataConfig(path="outputs/data/synthetic"))
    cs.store(group="data", name="shards", node=DataConfig())
    for name, cls in STAGE_CONFIGS.items():
        cs.store(group="stage", name=name, node=cls())
    cs.store(group="optim", name="adamw", node=OptimConfig(name="adamw"))
    cs.store(group="optim", name="muon", node=OptimConfig(name="muon"))
    for backend in ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        cs.store(group="dist", name=backend, node=DistConfig(backend=backend))
    cs.store(group="logger", name="default", node=LoggerConfig())
    cs.store(group="logger", name="wandb_online", node=LoggerConfig(wandb=True, wandb_mode="online"))


def check_known_keys(cfg: Any, path: str = "") -> None:
    """Raise if a typed node holds a key its dataclass does not declare (``+optim.lrr=1`` gets past Hydra)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    typ = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(typ):
        known = {f.name for f in dataclasses.fields(typ)}
        unknown = sorted(set(cfg.keys()) - known)
        if unknown:
            where = path or "<root>"
            raise KeyError(f"config key '{path + '.' if path else ''}{unknown[0]}' is not in {typ.__name__} (at '{where}'); known keys: {sorted(known)}")
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            check_known_keys(node, f"{path}.{key}" if path else str(key))
