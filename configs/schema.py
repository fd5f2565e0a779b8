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
from distill.config import DISTILL_STAGE_CONFIGS
from rl.config import RL_STAGE_CONFIGS
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
    """Populate the ConfigStore and the run-naming resolvers of ``config.yaml`` (idempotent)."""
    from train.runs import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name in ("tiny", "small", "base", "hy15", "hy15_released"):
        cs.store(group="model", name=name, node=preset(name))
    cs.store(group="autoencoder", name="patch", node=AutoencoderConfig(kind="patch"))
    cs.store(group="autoencoder", name="hunyuan15", node=AutoencoderConfig(kind="hunyuan15"))
    cs.store(group="autoencoder", name="wan", node=AutoencoderConfig(kind="wan"))
    cs.store(group="text_encoder", name="none", node=TextEncoderConfig(kind="none"))
    cs.store(group="text_encoder", name="hf", node=TextEncoderConfig(kind="hf"))
    cs.store(group="text_encoder", name="precomputed", node=TextEncoderConfig(kind="precomputed"))
    cs.store(group="data", name="synthetic", node=DataConfig(path="outputs/data/synthetic"))
    cs.store(group="data", name="shards", node=DataConfig())
    for name, cls in {**STAGE_CONFIGS, **DISTILL_STAGE_CONFIGS, **RL_STAGE_CONFIGS}.items():
        cs.store(group="stage", name=name, node=cls())
    cs.store(group="optim", name="adamw", node=OptimConfig(name="adamw"))
    cs.store(group="optim", name="muon", node=OptimConfig(name="muon"))
    for backend in ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        cs.store(group="dist", name=backend, node=DistConfig(backend=backend))
    cs.store(group="logger", name="default", node=LoggerConfig())
    cs.store(group="logger", name="wandb_online", node=LoggerConfig(wandb=True, wandb_mode="online"))


class ConfigError(ValueError):
    """A command line whose config does not compose or does not validate; the message names the key."""


def _unknown_key_message(typ: type, path: str, key: str) -> str:
    import dataclasses
    import difflib

    known = sorted(f.name for f in dataclasses.fields(typ))
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
    return f"config key '{full}' is not in {typ.__name__} (at '{path or '<root>'}'); known keys: {known}{hint}"


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
            raise KeyError(_unknown_key_message(typ, path, str(unknown[0])))
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            check_known_keys(node, f"{path}.{key}" if path else str(key))


def first_point(overrides: list[str]) -> list[str]:
    """The overrides with every sweep (``optim.lr=1e-4,3e-4``) replaced by its first value: a composable point."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(o.type, "")
        out.append(f"{prefix}{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
    return out


def _composition_message(e: BaseException) -> str:
    """Hydra's composition error, reworded where its hint misleads (``+key`` cannot add keys to a typed group)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "object_type", None) is not None:
        import dataclasses

        typ, full = cause.object_type, str(cause.full_key)
        path, _, key = full.rpartition(".")
        if dataclasses.is_dataclass(typ):
            return _unknown_key_message(typ, path, key)
    if isinstance(cause, ValidationError):
        return f"{str(e).splitlines()[0]}: {str(cause).splitlines()[0]}"
    text = str(e)
    return text.split("\nConfig search path")[0].strip()  # the search-path dump says nothing about the mistake


def compose_checked(overrides: list[str], *, return_hydra_config: bool = False) -> tuple[Any, Any]:
    """Compose ``config`` with ``overrides`` and run every config check a run would, before anything is written.

    Returns (the DictConfig, the typed dataclass tree of the job config). Sweeps are checked at their
    first point. Raises :class:`ConfigError` naming the key (misspelt keys, ``+key`` added to a typed
    group, wrong types, values out of range).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from configs import CONFIG_DIR

    register_configs()
    try:
        point = first_point(overrides)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("config", overrides=point, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_composition_message(e)) from None
    job = cfg
    if return_hydra_config:
        import copy

        job = copy.deepcopy(cfg)  # without the hydra node, with the same structured types
        with open_dict(job):
            del job["hydra"]
    try:
        check_known_keys(job)
        obj = OmegaConf.to_object(job)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    except (ValueError, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return cfg, obj
