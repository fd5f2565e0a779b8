"""Clip-level group rollouts (WorldCompass §1.3) through the one sampler, ``models.rollout.Rollout``.

For a target chunk n of a batch of P groups (a start image and a path each):

1. the prefix, chunks 1..n-1, is generated once per group by the rollout policy (the EMA shadow) with
   the deterministic Euler ODE: ``Rollout.start`` + ``Rollout.step``, i.e. memory retrieval, reframing
   and the KV cache exactly as at inference;
2. the target chunk's context (memory selection, reframing, K/V) is filled once per group
   (``Rollout.context``), the state and that context are branched G times
   (``RolloutState.repeat_interleave``, ``ChunkContext.repeat_interleave``) and the G candidates of chunk n
   are sampled as one batch from it (``Rollout.step(..., context=..., commit=False)``), each from its own noise;
3. the minimal latent segment is decoded (a few prefix latents for a causal VAE's warm-up, then the
   chunk) into latent-rate frames, kept in memory (no video files), and assembled with the commanded
   path, the true renders and the revisit references into a ``RewardBatch``.

The same code scores whole evaluation rollouts chunk by chunk (:func:`reward_batch` with G = 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from data.latents import latent_frame_index
from eval.protocols.runner import to_uint8_video
from models.rollout import ChunkRecord, Rollout, RolloutState
from rl.paths import PathSource, RLPath
from rl.rewards.base import RewardBatch

__all__ = ["PhaseTimer", "GroupRollout", "encode_images", "roll_out_group", "latent_frames", "reward_batch"]


class PhaseTimer:
    """Wall time per phase of a step ("prefix", "candidates", ...); syncs the device at each mark when ``sync``."""

    def __init__(self, device: torch.device, sync: bool = True):
        self.device, self.sync = device, sync
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


@dataclass
class GroupRollout:
    """P groups' prefixes and their G candidates each (rows are group-major: row = g * G + j)."""

    paths: list[RLPath]
    G: int
    start: int  # first latent of the target chunk
    prefix: RolloutState  # batch P: the shared histories (start latents)
    record: ChunkRecord  # the candidates: latents [P*G, C, L, h, w], pinned
    candidates: RolloutState  # batch P*G: the branched state the candidates were sampled from
    actions: Tensor  # [P*G, L] conditioning of the target chunk
    w2c: Tensor  # [P*G, L, 4, 4]
    K: Tensor  # [P*G, L, 3, 3]

    @property
    def group(self) -> Tensor:
        return torch.arange(len(self.paths)).repeat_interleave(self.G)


@torch.no_grad()
def encode_images(autoencoder: nn.Module, images: list[np.ndarray], device: torch.device) -> Tensor:
    """Conditioning latents [P, C, h, w] of uint8 images [H, W, 3] (as inference encodes its start image)."""
    frames = torch.stack([torch.from_numpy(np.ascontiguousarray(im)) for im in images]).permute(0, 3, 1, 2)[:, :, None]
    return autoencoder.encode(frames.float().div(127.5).sub(1.0).to(device))[:, :, 0]


def _stack(paths: list[RLPath], name: str, upto: int, device: torch.device) -> Tensor:
    return torch.stack([getattr(p, name)[:upto] for p in paths]).to(device)


@torch.no_grad()
def roll_out_group(
    rollout: Rollout,
    autoencoder: nn.Module,
    paths: list[RLPath],
    n_chunk: int,
    G: int,
    generator: Optional[torch.Generator],
    device: torch.device,
    text: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    timer: Optional[PhaseTimer] = None,
) -> GroupRollout:
    """Generate the prefix of target chunk ``n_chunk`` (1-based) once per path, then G candidates of the chunk.

    ``rollout`` holds the rollout policy; text: (tokens [P, L, D], mask) or None. Noise is drawn from
    ``generator`` in the sampler's order: the prefix chunks (batch P), then the candidates (batch P*G).
    """
    C = rollout.cfg.chunk_size
    if rollout.cfg.mode != "ar":
        raise ValueError("RL rollouts are chunk-wise autoregressive: the bundle's sampling.mode must be 'ar'")
    start = (n_chunk - 1) * C
    need = start + C
    short = [p.num_latents for p in paths if p.num_latents < need]
    if short:
        raise ValueError(f"roll_out_group: target chunk {n_chunk} needs paths of {need} latents, got {short}")
    image = encode_images(autoencoder, [p.path.image for p in paths], device)
    actions, w2c, K = (_stack(paths, n, need, device) for n in ("actions", "w2c", "K"))
    tokens, mask = text if text is not None else (None, None)
    state = rollout.start(image, tokens, mask)
    for s in range(0, start, C):
        rollout.step(state, actions[:, s:s + C], w2c[:, s:s + C], K[:, s:s + C], generator)
    if timer is not None:
        timer.mark("prefix")
    sl = slice(start, need)
    shared = rollout.context(state, actions[:, sl], w2c[:, sl], K[:, sl])  # the memory selected and its K/V filled once per group
    cand = state.repeat_interleave(G)
    a, w, k = actions[:, sl].repeat_interleave(G, 0), w2c[:, sl].repeat_interleave(G, 0), K[:, sl].repeat_interleave(G, 0)
    record = rollout.step(cand, a, w, k, generator, commit=False, context=shared.repeat_interleave(G))
    if timer is not None:
        timer.mark("candidates")
    return GroupRollout(paths, G, start, state, record, cand, a, w, k)


@torch.no_grad()
def latent_frames(autoencoder: nn.Module, latents: Tensor) -> Tensor:
    """Decoded latent-rate frames uint8 [B, T, H, W, 3] (CPU) of latents [B, C, T, h, w]: the last frame of each
    latent's group (``data.latents``), i.e. the frame whose pose the model was given."""
    video = autoencoder.decode(latents.float())  # [B, 3, F, H, W]
    idx = latent_frame_index(video.shape[2], int(autoencoder.temporal_stride))
    return torch.from_numpy(to_uint8_video(video[:, :, idx]))


def _repeat(x: Tensor, G: int) -> Tensor:
    return x.repeat_interleave(G, 0)


@torch.no_grad()
def reward_batch(
    autoencoder: nn.Module,
    paths: list[RLPath],
    prefix: Tensor,
    candidates: Tensor,
    G: int,
    pinned: Optional[Tensor],
    steps,
    *,
    decode_pad: int = 2,
    revisit: bool = False,
    alt_truth: Optional[Callable[[int, RLPath], Optional[np.ndarray]]] = None,
    timer: Optional[PhaseTimer] = None,
) -> RewardBatch:
    """The reward batch of candidates [P*G, C, L, h, w] after shared histories ``prefix`` [P, C, N, h, w].

    Decodes the last ``decode_pad`` history latents with each candidate (one is enough for a stride-1
    autoencoder), and the whole history when ``revisit`` and a revisited pose falls in the chunk.
    alt_truth(group, path): the true frames of the path not taken (or None). ``steps``: MotionSteps.
    """
    P, N = prefix.shape[0], prefix.shape[2]
    L = candidates.shape[2]
    stride = int(autoencoder.temporal_stride)
    pad = 0 if N == 0 else min(N, 1 if stride == 1 else max(1, decode_pad))
    seg = torch.cat([_repeat(prefix[:, :, N - pad:N], G), candidates.to(prefix.dtype)], dim=2)
    frames = latent_frames(autoencoder, seg)  # [R, pad + L, H, W, 3]
    cand_frames = frames[:, pad:]
    prev = frames[:, pad - 1] if pad else None
    R = cand_frames.shape[0]

    def per_group(values: list[Optional[np.ndarray]]) -> Optional[Tensor]:
        if any(v is None for v in values):
            return None  # all groups or none (a step mixing synthetic and other clips drops these references)
        return _repeat(torch.from_numpy(np.stack(values)), G)

    sl = slice(N, N + L)
    truth = per_group([p.path.truth[sl] if p.path.truth is not None else None for p in paths])
    alt = per_group([alt_truth(g, p) for g, p in enumerate(paths)]) if alt_truth is not None and truth is not None else None
    ref = mask = None
    if revisit:
        twins = torch.full((P, L), -1, dtype=torch.long)
        for g, p in enumerate(paths):
            if p.path.pairs is None:
                continue
            for ret, out in p.path.pairs.tolist():
                if N <= ret < N + L and out < ret:
                    twins[g, ret - N] = out
        if bool((twins >= 0).any()):
            history = latent_frames(autoencoder, prefix) if N else torch.zeros(P, 0, *cand_frames.shape[2:], dtype=torch.uint8)
            full = torch.cat([_repeat(history, G), cand_frames], dim=1)  # [R, N + L, H, W, 3]
            t = _repeat(twins, G)
            idx = t.clamp_min(0)
            ref = full[torch.arange(R)[:, None], idx]
            mask = t >= 0
    if timer is not None:
        timer.mark("decode")
    scored = ~pinned.cpu() if pinned is not None else torch.ones(R, L, dtype=torch.bool)
    return RewardBatch(
        frames=cand_frames,
        first_frame=_repeat(torch.from_numpy(np.stack([p.path.image for p in paths])), G),
        prev_frame=prev,
        keys=_repeat(torch.stack([p.path.keys[sl].bool() for p in paths]), G),
        c2w=_repeat(torch.stack([p.path.c2w[sl].double() for p in paths]), G),
        K=_repeat(torch.stack([p.K_pixel.double() for p in paths]), G),
        steps=steps,
        scored=scored,
        group=torch.arange(P).repeat_interleave(G),
        start=N,
        truth=truth,
        truth_alt=alt,
        revisit_ref=ref,
        revisit_mask=mask,
    )


def source_alt_truth(source: PathSource, start: int, length: int, step: int) -> Callable[[int, RLPath], Optional[np.ndarray]]:
    """alt_truth callback of :func:`reward_batch` for paths planned by ``source`` at ``step``."""
    return lambda g, p: source.alt_truth(p, start, length, step, g)
