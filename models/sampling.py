"""A bundle's ``sampling`` section: the rollout defaults plus what it records about its video.

Read by the inference player and the evaluation protocols alike (one parser): the keys of
:class:`models.rollout.RolloutConfig`, and the video keys below, which the trainer exports
(``height``, ``width``, ``model_type`` and the pose -> action thresholds) or a user may add.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from models.layout import check_trained_span
from models.rollout import RolloutConfig

VIDEO_KEYS = (
    "height", "width", "fps", "model_type", "translation_step", "rotation_step_deg",
    "translation_threshold", "rotation_threshold_deg", "fov_x_deg", "negative_prompt",
    "trained_positions",  # temporal positions 0..n-1 were trained: AR sampling must not reach beyond them
)


def split_sampling(section: Mapping[str, Any] | RolloutConfig, where: str) -> tuple[RolloutConfig, dict[str, Any]]:
    """(RolloutConfig, video keys) of a sampling section; ValueError naming ``where`` and the key on bad input.

    A bidirectional model (``model_type: bidirectional``) only matches window mode; the caller decides
    whether to switch (``video["model_type"]`` is returned untouched).
    """
    from omegaconf import OmegaConf

    if isinstance(section, RolloutConfig):
        section = dataclasses.asdict(section)
    elif isinstance(section, Mapping):
        section = OmegaConf.to_container(OmegaConf.create(dict(section)), resolve=True)
    else:
        raise TypeError(f"{where}: sampling must be a mapping or a RolloutConfig, got {type(section).__name__}")
    rollout_keys = {f.name for f in dataclasses.fields(RolloutConfig)}
    unknown = sorted(set(section) - rollout_keys - set(VIDEO_KEYS))
    if unknown:
        raise ValueError(f"{where}: sampling has unknown keys {unknown}; expected RolloutConfig fields {sorted(rollout_keys)} or video keys {list(VIDEO_KEYS)}")
    video = {k: section.pop(k) for k in VIDEO_KEYS if k in section}
    if video.get("model_type") not in (None, "ar", "bidirectional"):
        raise ValueError(f"{where}: sampling.model_type must be 'ar' or 'bidirectional', got {video['model_type']!r}")
    try:
        rcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RolloutConfig), section))
    except Exception as e:  # omegaconf's validation errors and RolloutConfig.validate's ValueError
        raise ValueError(f"{where}: sampling: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    trained = video.get("trained_positions")
    check_trained_span(rcfg.memory, rcfg.unit, rcfg.mode, None if trained is None else int(trained), where)
    return rcfg, video
