"""A run's parent bundle (``init=BUNDLE``): its weights into this run's model, or an error that says
which config values differ.

A bundle's ``config.yaml`` records the model it was trained with. When this run's ``model`` config
builds a different network (``model.hidden=48`` against a bundle trained at 96), loading would fail
with one ``size mismatch`` line per tensor; :func:`init_from_bundle` instead names the differing
values and the overrides that make the run match the bundle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from models.bundle import Bundle, load_bundle, read_bundle_config


def model_config_differences(bundle_section: dict[str, Any], run_cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{key: (bundle value, run value)} for every model key both record and that differ."""
    run = dataclasses.asdict(run_cfg) if dataclasses.is_dataclass(run_cfg) else dict(run_cfg)

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    return {k: (bundle_section[k], run[k]) for k in run if k in bundle_section and norm(bundle_section[k]) != norm(run[k])}


def _override(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"model.{key}=[{','.join(str(v) for v in value)}]"
    return f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"


# Model config values that change what the weights compute without changing their shapes: a run that starts
# from a bundle must agree with it on these, or it would train a different function from the same tensors.
FUNCTION_KEYS = ("prediction", "skip_sigma_data", "image_warp")


def init_from_bundle(model: nn.Module, model_cfg: Any, path: str | Path) -> Bundle:
    """Load the bundle at ``path`` into ``model`` (strict); return the loaded bundle (meta, sampling, model).

    Raises ValueError naming the differing model config values (bundle vs run) and the overrides
    that match the bundle, when the bundle's weights do not fit ``model`` or when a value of
    FUNCTION_KEYS differs.
    """
    path = Path(path)
    meaning = {k: v for k, v in model_config_differences(read_bundle_config(path)["model"], model_cfg).items()
               if k in FUNCTION_KEYS}
    if meaning:
        listed = ", ".join(f"{k} (bundle {b!r}, run {r!r})" for k, (b, r) in meaning.items())
        fix = " ".join(_override(k, b) for k, (b, _) in meaning.items())
        raise ValueError(f"init={path}: the run reads the bundle's weights differently: {listed}. "
                         f"Train with the bundle's model: add {fix}")
    parent = load_bundle(path, load_autoencoder=False, load_text_encoder=False)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in parent.model.state_dict().items()}
    if want != have:
        diffs = model_config_differences(read_bundle_config(path)["model"], model_cfg)
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        keys = sorted(set(want) ^ set(have))
        what = (f"{len(shapes)} tensors differ in shape" if shapes else "") + (", " if shapes and keys else "") + \
               (f"{len(keys)} tensors exist in only one of them" if keys else "")
        if diffs:
            listed = ", ".join(f"{k} (bundle {b!r}, run {r!r})" for k, (b, r) in diffs.items())
            fix = " ".join(_override(k, b) for k, (b, _) in diffs.items())
            raise ValueError(f"init={path}: the bundle's model does not fit this run's ({what}); model config values that "
                             f"differ: {listed}. Train with the bundle's model: add {fix}")
        raise ValueError(f"init={path}: the bundle's model does not fit this run's ({what}, e.g. "
                         f"{(shapes or keys)[0]}), although their model configs agree")
    model.load_state_dict(parent.model.state_dict(), strict=True)
    return parent
