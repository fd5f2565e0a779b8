"""Bundles: the directory every stage exports and the inference module runs with nothing else.

Layout::

    model.safetensors      weights to run (the EMA weights where the stage keeps an EMA)
    model_raw.safetensors  the raw (non-EMA) weights, only when an EMA was exported
    config.yaml            sections model (WorldDiTConfig), autoencoder, text_encoder, sampling
    meta.json              stage, step, parent, data, metrics, config hash, code version, created,
                           and each weights file's size and SHA-256

Saving is atomic (everything is written into a hidden sibling directory that is then renamed) and
refuses to replace an existing bundle unless asked. Loading is strict: a missing file, a missing or
unexpected key, a shape mismatch or a damaged weights file each raise their own ``BundleError``
naming the file, key and shapes. Relative ``path`` entries of the autoencoder / text-encoder
sections resolve against the bundle directory first, so a bundle can carry its own embeddings file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from models.autoencoders import Autoencoder, AutoencoderConfig, build_autoencoder
from models.text_encoders import TextEncoder, TextEncoderConfig, build_text_encoder

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
SECTIONS = ("model", "autoencoder", "text_encoder", "sampling")

PathLike = Union[str, os.PathLike]
ModelFactory = Callable[[Mapping[str, Any]], nn.Module]


class BundleError(RuntimeError):
    """A bundle that cannot be written or loaded; the message names the bundle and what is wrong."""


class BundleExistsError(BundleError):
    """The target directory already exists and ``overwrite`` was not given."""


class BundleFileError(BundleError):
    """A file the bundle needs is missing or unreadable."""


class BundleCorruptError(BundleFileError):
    """A weights file is truncated or damaged (bad header, wrong size, checksum mismatch)."""


class BundleConfigError(BundleError):
    """``config.yaml`` lacks a section or a section does not fit its schema."""


class BundleKeyError(BundleError):
    """The weights and the model built from the config disagree on parameter names."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing, self.unexpected = missing, unexpected


class BundleShapeError(BundleError):
    """A weight's shape differs from the model parameter it loads into."""

    def __init__(self, message: str, key: str, expected: tuple[int, ...], found: tuple[int, ...]):
        super().__init__(message)
        self.key, self.expected, self.found = key, expected, found


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, weights loaded strictly) and everything needed to run it."""

    path: Path
    model: nn.Module
    config: dict[str, Any]
    meta: dict[str, Any]
    autoencoder: Optional[Autoencoder] = None
    text_encoder: Optional[TextEncoder] = None
    sampling: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- helpers


def _plain(obj: Any, where: str) -> dict[str, Any]:
    """A config section (dataclass, DictConfig or mapping) as a plain YAML-able dict."""
    from omegaconf import DictConfig, OmegaConf

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = OmegaConf.structured(obj)
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(obj)), resolve=True)
    raise BundleError(f"save_bundle: {where} must be a dataclass or a mapping, got {type(obj).__name__}")


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a bundle config (sorted-key JSON, SHA-256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of this checkout (``-dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    # Read-only git calls (--no-optional-locks): never touch the index of a checkout others use.
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            dirty = status.returncode == 0 and status.stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"worldsmith=={version('worldsmith')}"
    except Exception:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile / DDP wrappers (their state-dict keys carry prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        if hasattr(v, "full_tensor"):  # a DTensor shard (FSDP2 / tensor parallel)
            raise BundleError(
                f"save_bundle: '{k}' is a sharded DTensor; pass a full state dict gathered on one rank "
                f"(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)"
            )
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _compare(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise BundleKeyError / BundleShapeError when ``found`` does not match ``expected`` exactly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")

        parts = ([f"missing keys: {show(missing)}"] if missing else []) + (
            [f"unexpected keys: {show(unexpected)}"] if unexpected else []
        )
        raise BundleKeyError(f"{what}: {'; '.join(parts)}", missing, unexpected)
    bad = sorted(k for k, shape in expected.items() if tuple(found[k]) != tuple(shape))
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more mismatched keys: {', '.join(bad[1:6])}{', ...' if len(bad) > 6 else ''})"
        raise BundleShapeError(
            f"{what}: key '{k}': model expects shape {list(expected[k])}, weights have {list(found[k])}"
            + (more if len(bad) > 1 else ""),
            k, tuple(expected[k]), tuple(found[k]),
        )


# ---------------------------------------------------------------- save


def save_bundle(
    directory: PathLike,
    model: Union[nn.Module, Mapping[str, Tensor]],
    *,
    model_cfg: Any,
    autoencoder_cfg: Any,
    text_encoder_cfg: Any,
    sampling: Any,
    meta: Mapping[str, Any],
    ema_state: Optional[Mapping[str, Tensor]] = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically and return its path.

    ``model`` is the unsharded module or its full state dict (gathered from FSDP on rank 0). With
    ``ema_state``, ``model.safetensors`` holds the EMA weights and ``model_raw.safetensors`` the raw
    ones. ``meta`` carries stage, step, parent, data, metrics (any JSON values); the config hash,
    code version, creation time and file checksums are added. Call it on one rank only.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise BundleExistsError(f"bundle {directory} already exists; pass overwrite=True to replace it")

    raw = _cpu_state(model if isinstance(model, Mapping) else _unwrap(model).state_dict())
    weights = {WEIGHTS: raw}
    if ema_state is not None:
        ema = _cpu_state(ema_state)
        _compare({k: tuple(v.shape) for k, v in raw.items()}, {k: tuple(v.shape) for k, v in ema.items()},
                 f"save_bundle {directory}: ema_state vs model")
        weights = {WEIGHTS: ema, RAW_WEIGHTS: raw}

    config = {
        "model": _plain(model_cfg, "model_cfg"),
        "autoencoder": _plain(autoencoder_cfg, "autoencoder_cfg"),
        "text_encoder": _plain(text_encoder_cfg, "text_encoder_cfg"),
        "sampling": _plain(sampling, "sampling"),
    }
    full_meta: dict[str, Any] = {"stage": None, "step": None, "parent": None, "data": None, "metrics": {}}
    full_meta.update(dict(meta))
    full_meta.setdefault("code_version", code_version())
    full_meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    full_meta["format"] = FORMAT_VERSION
    full_meta["config_hash"] = config_hash(config)
    full_meta["num_parameters"] = int(sum(v.numel() for v in raw.values()))
    for k, v in full_meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError) as e:
            raise BundleError(f"save_bundle {directory}: meta['{k}'] is not JSON-serialisable: {e}") from None

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        files = {}
        for name, state in weights.items():
            kind = "ema" if (name == WEIGHTS and ema_state is not None) else "raw"
            save_file(state, str(tmp / name), metadata={"format": "pt", "worldsmith.weights": kind})
            files[name] = {"weights": kind, "bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        full_meta["files"] = files
        OmegaConf.save(OmegaConf.create(config), tmp / CONFIG)
        (tmp / META).write_text(json.dumps(full_meta, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:12]}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ---------------------------------------------------------------- load


def _require(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise BundleFileError(f"bundle {directory}: not a directory")
    path = directory / name
    if not path.is_file():
        raise BundleFileError(f"bundle {directory}: missing file {name}")
    return path


def read_bundle_config(directory: PathLike) -> dict[str, Any]:
    """The four config sections of a bundle as plain dicts."""
    from omegaconf import OmegaConf

    directory = Path(directory)
    path = _require(directory, CONFIG)
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise BundleFileError(f"bundle {directory}: cannot parse {CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise BundleConfigError(f"bundle {directory}: {CONFIG} must be a mapping")
    for section in SECTIONS:
        if not isinstance(config.get(section), dict):
            raise BundleConfigError(f"bundle {directory}: {CONFIG} lacks section '{section}'")
    return config


def read_bundle_meta(directory: PathLike) -> dict[str, Any]:
    """The bundle's ``meta.json``."""
    directory = Path(directory)
    path = _require(directory, META)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise BundleFileError(f"bundle {directory}: cannot parse {META}: {e}") from None


def _structured(schema: type, section: Mapping[str, Any], where: str) -> Any:
    """``section`` merged onto dataclass ``schema``: unknown keys and bad types raise BundleConfigError."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(section)))
    except Exception as e:
        raise BundleConfigError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def worlddit_factory(model_section: Mapping[str, Any]) -> nn.Module:
    """Build a ``WorldDiT`` from a bundle's ``model`` section (the default model factory)."""
    from models.config import WorldDiTConfig
    from models.dit import WorldDiT

    section = dict(model_section)
    # Bundles written before the prediction switch existed were all trained as v-prediction.
    section.setdefault("prediction", "v")
    return WorldDiT(_structured(WorldDiTConfig, section, f"{CONFIG} section 'model'"))


def _open_weights(directory: Path, name: str, meta: Mapping[str, Any], verify: bool):
    """An open safetensors handle for ``name``, after the size (and optionally checksum) check."""
    from safetensors import SafetensorError, safe_open

    path = _require(directory, name)
    record = (meta.get("files") or {}).get(name)
    if record is not None:
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleCorruptError(
                f"bundle {directory}: {name} is {size} bytes but was written as {record['bytes']} (truncated?)"
            )
        if verify and _sha256(path) != record["sha256"]:
            raise BundleCorruptError(f"bundle {directory}: {name} fails its SHA-256 check (corrupted)")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise BundleCorruptError(f"bundle {directory}: {name} is not a valid safetensors file: {e}") from None


def _resolve_path(section: dict[str, Any], directory: Path) -> dict[str, Any]:
    p = section.get("path")
    if p and not Path(p).is_absolute() and (directory / p).exists():
        section = {**section, "path": str(directory / p)}
    return section


def load_bundle(
    directory: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    weights: str = "model",
    model_factory: Optional[ModelFactory] = None,
    load_autoencoder: bool = True,
    load_text_encoder: bool = True,
    verify: bool = False,
) -> Bundle:
    """Load a bundle: the model built from ``config.yaml`` with its weights loaded strictly.

    weights: "model" (what to run: EMA where kept) or "raw" (``model_raw.safetensors``).
    model_factory: model-section dict -> module; defaults to :func:`worlddit_factory`.
    dtype: cast floating-point weights after loading. verify: also check the files' SHA-256.
    """
    directory = Path(directory)
    config = read_bundle_config(directory)
    meta = read_bundle_meta(directory)
    if weights not in ("model", "raw"):
        raise ValueError(f"load_bundle: weights must be 'model' or 'raw', got {weights!r}")
    name = WEIGHTS if weights == "model" else RAW_WEIGHTS
    handle = _open_weights(directory, name, meta, verify)

    factory = model_factory or worlddit_factory
    try:
        with torch.device(device):
            model = factory(config["model"])
    except BundleConfigError as e:  # the factory knows the section, not the bundle: name it
        raise BundleConfigError(str(e) if str(directory) in str(e) else f"bundle {directory}: {e}") from None
    except BundleError:
        raise
    except Exception as e:
        raise BundleConfigError(
            f"bundle {directory}: cannot build the model from {CONFIG} section 'model': {type(e).__name__}: {e}"
        ) from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    _compare(expected, found, f"bundle {directory}: {name}")
    try:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:
        raise BundleCorruptError(f"bundle {directory}: cannot read tensors of {name}: {e}") from None
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()

    autoencoder = text_encoder = None
    if load_autoencoder:
        ae_cfg = _structured(AutoencoderConfig, _resolve_path(config["autoencoder"], directory),
                             f"bundle {directory}: {CONFIG} section 'autoencoder'")
        autoencoder = build_autoencoder(ae_cfg).to(device)
    if load_text_encoder:
        te_cfg = _structured(TextEncoderConfig, _resolve_path(config["text_encoder"], directory),
                             f"bundle {directory}: {CONFIG} section 'text_encoder'")
        text_encoder = build_text_encoder(te_cfg).to(device)
    return Bundle(directory, model, config, meta, autoencoder, text_encoder, dict(config["sampling"]))


def find_bundle_dir(path: PathLike) -> Path:
    """The bundle a user means by ``path``: a bundle directory, or a run directory / its ``export/``
    (``<run>/export/bundle``). BundleFileError naming what was looked for otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise BundleFileError(f"bundle {path}: not a directory")
    for cand in (path / "bundle", path / "export" / "bundle"):  # a run's export/, a run (whose config.yaml is no bundle's)
        if not (path / META).exists() and not (path / WEIGHTS).exists() and (cand / CONFIG).is_file():
            return cand
    if any((path / f).exists() for f in (WEIGHTS, CONFIG, META)):
        return path  # a bundle, possibly a damaged one: loading names what is wrong
    raise BundleFileError(f"bundle {path}: not a bundle directory ({CONFIG} + {META} + {WEIGHTS}), "
                          "and holds no export/bundle/ (a run directory) or bundle/ (a run's export/)")
