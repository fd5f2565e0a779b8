"""Stage ``pretrain``: action-conditioned flow matching on pose-annotated clips (WorldPlay §4.2).

``mode=causal``: block-causal chunks with one logit-normal sigma per chunk (diffusion forcing), so
the model learns to continue from a clean-or-noisier past; ``mode=bidirectional``: one sigma for
the whole window. Image-to-video: latent 0 is the pinned image (models.layout); text/action/camera
dropout for guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.flow import chunk_sigmas, sample_train_sigma
from models.layout import sliding_window, window_layout
from train.stage import register_stage
from train.stages.flow_stage import FlowStage, FlowStageConfig
from train.stages.inputs import ModelInputs, clip_inputs, layout_inputs


@dataclass
class PretrainConfig(FlowStageConfig):
    """Pretraining knobs (all of FlowStageConfig)."""

    name: str = "pretrain"


def window_sigmas(B: int, T: int, scfg: FlowStageConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Training sigma [B, T]: one per chunk (causal) or one per window (bidirectional)."""
    if scfg.mode == "causal":
        s = chunk_sigmas(B, T, scfg.chunk_size, generator, scfg.logit_mean, scfg.logit_std, scfg.train_shift, device=generator.device)
    elif scfg.mode == "bidirectional":
        s = sample_train_sigma((B, 1), generator, scfg.logit_mean, scfg.logit_std, scfg.train_shift, device=generator.device).expand(B, T)
    else:
        raise ValueError(f"stage.mode must be 'causal' or 'bidirectional', got {scfg.mode!r}")
    return s.to(device)


@register_stage("pretrain")
class Pretrain(FlowStage):
    def bundle_sampling(self) -> dict[str, Any]:
        """Pretraining sees contiguous windows only, so its bundle samples with a sliding window of the
        trained length (no anchor or retrieved chunks: those layouts come with mid-training)."""
        s = super().bundle_sampling()
        if self.scfg.mode == "causal":
            rcfg = self.rollout_config()
            s["memory"] = asdict(sliding_window(rcfg.memory, rcfg.unit, self.trained_positions()))
        return s

    def make_inputs(self, batch: dict[str, Any], x0: torch.Tensor, step: int) -> ModelInputs:
        causal = self.scfg.mode == "causal"
        if causal and x0.shape[2] % self.scfg.chunk_size:
            raise ValueError(f"data.num_latents={x0.shape[2]} must be a multiple of stage.chunk_size={self.scfg.chunk_size} in causal mode")
        B, _, T = x0.shape[:3]
        clip = clip_inputs(batch, x0, self.scfg.chunk_size if causal else None)
        layouts = [window_layout(1, 0, T, x0.device)] * B
        return layout_inputs(clip, layouts, window_sigmas(B, T, self.scfg, self.generator, x0.device), 0.0)
