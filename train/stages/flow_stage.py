"""The shared body of flow-matching stages: roles, data, conditioning, sampling, bundle export.

A flow stage trains one role, ``student`` (a WorldDiT, optionally LoRA-wrapped, optionally
initialised from a parent bundle), with an EMA. Subclasses decide only how a batch becomes
:class:`~train.stages.inputs.ModelInputs` (``make_inputs``): the pretrain stage uses whole windows,
the mid-train stage memory layouts. Everything else (text encoding, dropout for guidance, the
loss, periodic sample videos, the bundle with lineage) lives here once.
"""

from __future__ import annotations

import json
import warnings

from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from models.autoencoders import AutoencoderConfig, build_autoencoder
from models.bundle import read_bundle_meta, save_bundle
from models.config import WorldDiTConfig
from models.dit import WorldDiT
from models.layout import check_trained_span
from models.rollout import Rollout, RolloutConfig
from models.text_encoders import TextEncoderConfig, build_text_encoder
from train.config import EMAConfig
from train.data import DataConfig, build_train_loader
from train.lora import apply_lora, has_lora, merge_lora_state, save_adapter
from train.parent import init_from_bundle
from train.stage import Role, Stage, StageContext, StepOutput
from train.stages.inputs import ModelInputs, drop_conditioning, encode_video, flow_matching_loss


@dataclass
class FlowStageConfig:
    """Knobs shared by flow-matching stages (research/worldplay.md §4.2)."""

    name: str = "pretrain"
    mode: str = "causal"  # causal: block-causal chunks, one sigma per chunk | bidirectional: one sigma per window
    chunk_size: int = 4  # latents per chunk (causal mode; must equal sampling.chunk_size)
    loss_space: str = "v"  # the loss regresses velocities ("v") or clean samples ("x0"); models/flow.py
    sigma_floor: float = 0.05  # v-space loss on an x0 output divides by max(sigma, sigma_floor)
    train_shift: float = 3.0  # shift of the logit-normal training sigma
    logit_mean: float = 0.0
    logit_std: float = 1.0
    text_dropout: float = 0.1  # per-sample probability of dropping each condition (for guidance)
    action_dropout: float = 0.1
    camera_dropout: float = 0.1
    ema_decay: float = 0.999  # 0 disables the EMA
    ema_start: int = 0
    sample_latents: int = 8  # length of the periodic validation rollout (latents)
    sample_steps: int = 8  # denoising steps of the validation rollout
    # evaluation protocols (eval.protocols: short | long | action) run at every sample step; [] = none
    eval_protocols: list[str] = field(default_factory=list)
    eval_num: int = 2  # clips per protocol
    eval_data: Optional[str] = None  # held-out dataset directory (default: data.path)


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg):
        return asdict(cfg)
    return cfg


def _structured(cls: type, node: Any) -> Any:
    """A dataclass instance from a DictConfig / dict / instance (configs arrive as DictConfig from Hydra)."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), _plain(node)))


class FlowStage(Stage):
    """Base of the pretrain and mid-train stages; ``self.cfg`` is the whole run config."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.scfg = cfg.stage
        self.autoencoder: Optional[nn.Module] = None
        self.text_encoder: Optional[nn.Module] = None
        self.generator: Optional[torch.Generator] = None
        self.parent: Optional[dict[str, Any]] = None
        self.parent_positions: Optional[int] = None  # temporal positions the parent bundle was trained on
        self._val_batch: Optional[dict[str, Any]] = None

    # ---------------------------------------------------------------- roles and data
    def build(self, ctx: StageContext) -> dict[str, Role]:
        self.ctx = ctx
        self.model_cfg = _structured(WorldDiTConfig, self.cfg.model)
        model = WorldDiT(self.model_cfg)
        if self.cfg.init:
            parent = init_from_bundle(model, self.model_cfg, self.cfg.init)  # names differing model values
            self.parent = {"path": str(Path(self.cfg.init).resolve()), **{k: parent.meta.get(k) for k in ("stage", "step", "config_hash", "code_version", "created")}}
            self.parent_positions = parent.sampling.get("trained_positions")
        if self.cfg.lora.enabled:
            model = apply_lora(model, self.cfg.lora)
        self.autoencoder = build_autoencoder(_structured(AutoencoderConfig, self.cfg.autoencoder)).to(ctx.device).eval()
        self.text_encoder = build_text_encoder(_structured(TextEncoderConfig, self.cfg.text_encoder)).to(ctx.device).eval()
        if self.model_cfg.latent_channels != self.autoencoder.latent_channels:
            raise ValueError(
                f"model.latent_channels={self.model_cfg.latent_channels} but autoencoder '{self.cfg.autoencoder.kind}' "
                f"has {self.autoencoder.latent_channels} latent channels"
            )
        token_dim = self.model_cfg.latent_channels * int(np.prod(self.model_cfg.patch))
        if token_dim > self.model_cfg.hidden:
            # The network must pass the noise of every token channel through its hidden width to
            # predict the velocity eps - x0; a narrower width leaves an irreducible loss floor.
            raise ValueError(
                f"model.hidden={self.model_cfg.hidden} is narrower than a token's {token_dim} channels "
                f"(latent_channels {self.model_cfg.latent_channels} x patch {self.model_cfg.patch}); widen the model or "
                f"use an autoencoder with fewer latent channels (e.g. a smaller autoencoder.patch_size / temporal_patch)"
            )
        self.generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1000 + ctx.rank + 17)
        ema = EMAConfig(decay=self.scfg.ema_decay, start_step=self.scfg.ema_start) if self.scfg.ema_decay > 0 else None
        return {"student": Role(model, ema=ema)}

    def build_data(self, ctx: StageContext):
        return build_train_loader(self.cfg.data, self.autoencoder.temporal_stride, seed=ctx.seed, rank=ctx.rank, world=ctx.world_size)

    # The noise / sigma / dropout generator is checkpointed, so a resumed run draws what the uninterrupted one would.
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state and self.generator is not None:
            self.generator.set_state(state["generator"].cpu())

    # ---------------------------------------------------------------- the step
    def make_inputs(self, batch: dict[str, Any], x0: torch.Tensor, step: int) -> ModelInputs:
        """The one thing a flow stage decides: how a batch with clean latents x0 [B, C, T, h, w] is laid out."""
        raise NotImplementedError(f"stage '{self.name}' must implement make_inputs(batch, x0, step)")

    def _encode_text(self, captions: list[str], inp: ModelInputs) -> ModelInputs:
        if self.model_cfg.text_dim <= 0 or self.text_encoder.dim == 0 or _plain(self.cfg.text_encoder)["kind"] == "none":
            return inp
        tokens, mask = self.text_encoder.encode(captions)
        inp.text, inp.text_mask = tokens.to(self.device), mask.to(self.device)
        return inp

    def compute_losses(self, batch: dict[str, Any], step: int) -> StepOutput:
        x0 = encode_video(self.autoencoder, batch, self.device)
        inp = self.make_inputs(batch, x0, step)
        inp = self._encode_text(list(batch["caption"]), inp)
        inp = drop_conditioning(inp, text_p=self.scfg.text_dropout, action_p=self.scfg.action_dropout, camera_p=self.scfg.camera_dropout, generator=self.generator)
        eps = torch.randn(inp.x0.shape, generator=self.generator, device=self.generator.device).to(inp.x0.device)
        # the trainer owns autocast
        loss, _ = flow_matching_loss(self.models["student"], inp, eps, self.scfg.loss_space, self.scfg.sigma_floor)
        B, C, T, h, w = inp.x0.shape
        p = self.model_cfg.patch
        tokens = B * (T // p[0]) * (h // p[1]) * (w // p[2])
        return StepOutput(losses={"student": loss}, metrics={"loss": loss.detach()}, tokens=tokens)

    # ---------------------------------------------------------------- sampling and export
    def rollout_config(self) -> RolloutConfig:
        return _structured(RolloutConfig, self.cfg.sampling)

    def _student_for_eval(self, trainer) -> nn.Module:
        """A plain copy of the student with EMA weights (if kept), for sampling/export on this rank."""
        state = trainer.full_state_dict("student", ema=trainer.has_ema("student"))
        model = WorldDiT(self.model_cfg)
        model.load_state_dict(merge_lora_state(state, self.cfg.lora) if has_lora(state) else state, strict=True)
        return model.to(self.device).eval()

    def sample(self, trainer, step: int, out_dir: Path) -> dict[str, float]:
        """Roll the (EMA) student out on a fixed validation window; write gt|sample as an mp4; PSNR vs gt."""
        from data.video import write_mp4

        model = self._student_for_eval(trainer)  # collective under sharded backends: every rank calls it
        if not trainer.env.is_main:
            return {}
        if self._val_batch is None:
            dcfg = replace(_structured(DataConfig, self.cfg.data), batch_size=1, num_workers=0, shuffle=False, window="start", crop="center")
            self._val_batch = next(build_train_loader(dcfg, self.autoencoder.temporal_stride, seed=0))
        batch = self._val_batch
        rcfg = replace(self.rollout_config(), steps=self.scfg.sample_steps, guidance=1.0)
        x0 = encode_video(self.autoencoder, batch, self.device)
        T = min(x0.shape[2], self.scfg.sample_latents)
        T -= T % rcfg.unit
        if T == 0:
            return {}
        g = torch.Generator(device=self.device).manual_seed(1234)
        dev = self.device
        with torch.no_grad():
            res = Rollout(model, rcfg).generate(x0[:, :, 0], batch["actions"][:, :T].to(dev), batch["w2c"][:, :T].to(dev), batch["K"][:, :T].to(dev), generator=g)
            frames = to_uint8(self.autoencoder.decode(res.latents))[0]
            gt = to_uint8(self.autoencoder.decode(x0[:, :, :T]))[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_mp4(out_dir / "ground_truth_vs_sample.mp4", np.concatenate([gt, frames], axis=2), fps=16)
        mse = float(np.mean((frames.astype(np.float64) - gt.astype(np.float64)) ** 2))
        metrics = {"psnr": float(10 * np.log10(255.0**2 / max(mse, 1e-10)))}  # logged as sample/psnr
        if self.scfg.eval_protocols:
            from eval.hook import evaluate_model

            metrics.update(
                evaluate_model(
                    model, self.autoencoder, self.bundle_sampling(), self.scfg.eval_data or self.cfg.data.path,
                    num=self.scfg.eval_num, protocols=tuple(self.scfg.eval_protocols), train_latents=int(self.cfg.data.num_latents),
                    out_dir=out_dir / "eval", text_encoder=self.text_encoder if self.model_cfg.text_dim > 0 else None,
                )
            )
        return metrics

    def bundle_sampling(self) -> dict[str, Any]:
        """The sampling defaults a bundle carries (steps, schedule, guidance, memory, resolution)."""
        s = _plain(self.cfg.sampling)
        s["height"], s["width"] = int(self.cfg.data.height), int(self.cfg.data.width)
        s["model_type"] = "ar" if self.scfg.mode == "causal" else "bidirectional"
        if self.scfg.mode == "bidirectional":
            s["mode"] = "window"  # bidirectional models are sampled window by window (teacher layout)
        # pose -> action rule the model was trained with, so inference derives the same ids
        s["translation_threshold"] = float(self.cfg.data.translation_threshold)
        s["rotation_threshold_deg"] = float(self.cfg.data.rotation_threshold_deg)
        s.update(self._data_motion_units())
        span = self.trained_positions()
        if span is not None and self.scfg.mode == "causal":
            # Sampling may not reach temporal positions training never saw: shrink the memory (warning).
            rcfg = self.rollout_config()
            mem = check_trained_span(rcfg.memory, rcfg.unit, rcfg.mode, span, "bundle export", clamp=True)
            s["memory"] = asdict(mem)
            s["trained_positions"] = span
        return s

    def trained_positions(self) -> Optional[int]:
        """Temporal positions 0..n-1 this stage (and its parent) trained on; None if not a fixed span."""
        own = self.sequence_length()
        spans = [int(v) for v in (own, self.parent_positions) if v is not None]
        return max(spans) if spans else None

    def sequence_length(self) -> Optional[int]:
        """Latents in one training sequence (positions 0..n-1); pretraining trains whole windows."""
        return int(self.cfg.data.num_latents)

    def _data_motion_units(self, windows: int = 8) -> dict[str, float]:
        """Per-latent key increments and field of view of the training data, measured on a few windows.

        Pose strings at inference integrate held keys with these steps, so a model trained on any
        source is driven in the units it saw (WorldPlay's 0.08 units / 3 deg only fit its own data).
        """
        from data.geometry import euler_xyz_degrees, relative_pose

        dcfg = replace(_structured(DataConfig, self.cfg.data), batch_size=1, num_workers=0, shuffle=False, window="start", crop="center")
        loader = build_train_loader(dcfg, self.autoencoder.temporal_stride, seed=0)
        trans, rot, fov = [], [], []
        for _ in range(min(windows, len(loader.dataset))):
            b = next(loader)
            rel = relative_pose(b["c2w"][0, :-1].double(), b["c2w"][0, 1:].double())
            t = rel[:, :3, 3].norm(dim=-1)
            ang = euler_xyz_degrees(rel[:, :3, :3]).abs()[:, :2].amax(-1)
            trans.append(t[t > dcfg.translation_threshold])
            rot.append(ang[ang > dcfg.rotation_threshold_deg])
            fov.append(float(2 * np.degrees(np.arctan(0.5 / float(b["K"][0, 0, 0, 0])))))
        out: dict[str, float] = {"fov_x_deg": float(np.median(fov))}
        t, r = torch.cat(trans), torch.cat(rot)
        if len(t):
            out["translation_step"] = float(t.median())
        if len(r):
            out["rotation_step_deg"] = float(r.median())
        return out

    def export(self, trainer, out_dir: Path) -> None:
        """bundle/ (the weights to run: EMA if kept, LoRA merged) and, with LoRA, adapter/ from the same weights.

        base + adapter/adapter.safetensors = bundle/model.safetensors, and with an EMA
        base + adapter/adapter_raw.safetensors = bundle/model_raw.safetensors (the raw fine-tune).
        """
        ema = trainer.has_ema("student")
        run_state = trainer.full_state_dict("student", ema=ema)
        raw_state = trainer.full_state_dict("student", ema=False) if ema else None
        if not trainer.env.is_main:
            return
        lora = has_lora(run_state)
        meta = {
            "stage": self.name,
            "step": trainer.step,
            "parent": self.parent,
            "data": {"path": str(Path(self.cfg.data.path).resolve()), "num_latents": int(self.cfg.data.num_latents)},
            "metrics": last_logged_metrics(trainer.out_dir),
            "run_dir": str(trainer.out_dir.resolve()),
            "lora": _plain(self.cfg.lora) if lora else None,
        }
        if ema and trainer.step < 1.0 / (1.0 - self.scfg.ema_decay):
            horizon = round(1.0 / (1.0 - self.scfg.ema_decay))
            meta["ema_note"] = (f"EMA (stage.ema_decay={self.scfg.ema_decay}) of {trainer.step} steps, fewer than its ~{horizon}-step "
                                "horizon: model.safetensors lags the training; model_raw.safetensors holds the trained weights")
            warnings.warn(f"export {out_dir}: {meta['ema_note']} (run them with --weights raw, or lower stage.ema_decay)", stacklevel=2)
        if lora:
            save_adapter(run_state, self.cfg.lora, out_dir / "adapter", base=self.parent, raw_state=raw_state)
            run_state = merge_lora_state(run_state, self.cfg.lora)
            raw_state = merge_lora_state(raw_state, self.cfg.lora) if raw_state is not None else None
        save_bundle(
            out_dir / "bundle",
            raw_state if raw_state is not None else run_state,
            model_cfg=self.model_cfg,
            autoencoder_cfg=_plain(self.cfg.autoencoder),
            text_encoder_cfg=_plain(self.cfg.text_encoder),
            sampling=self.bundle_sampling(),
            meta=meta,
            ema_state=run_state if raw_state is not None else None,
            overwrite=True,
        )


def last_logged_metrics(run_dir: Path) -> dict[str, float]:
    """The last record of the run's metrics.jsonl (empty if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
