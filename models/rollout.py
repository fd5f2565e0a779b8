"""The rollout sampler: the one way Worldsmith generates video (inference, evaluation, RL, distillation).

Two modes, both over a growing history of clean latents and their cameras:

``ar`` (chunk-wise autoregressive, WorldPlay §4.3). For each new chunk of ``chunk_size`` latents:

1. rebuild the context from the history with :func:`models.memory.select_context` (recent latents,
   the anchor chunk, the best-overlapping past chunk) and reframe it to positions 0..M-1;
2. fill the model's KV cache **once** with the context (clean latents tagged ``context_sigma``,
   their own actions / cameras, block-causal or full attention inside the context); text K/V are
   computed once per prompt and kept in the same cache;
3. denoise the chunk only, every step attending to the cached text + context;
4. append the chunk's clean latents to the history.

``window`` (bidirectional models, the Context-Forcing teacher layout): a ``window_latents`` window
and its memory (the union of the memories of its chunk-sized sub-windows, minus the window) form one
sequence with full attention. The context's keys depend on the noisy window under full attention,
so nothing can be cached: every step runs the whole [context | window] sequence.

Schedules: ``euler`` walks the shifted ``steps``-step schedule with Euler steps (the ODE the
multi-step models are trained for). ``distilled`` walks the 4-step schedule σ = 1, .9375, .8333,
.625 → 0 and, by default, **re-noises** between steps: x ← (1−σ')·x̂0 + σ'·ε' with fresh noise ε'.
That is how Self-Forcing / DMD (research/rl_distill.md §3.3) roll the student out during
distillation, so the distilled student is sampled the way it was trained; set ``renoise=False`` to
walk the same σ with Euler steps instead (WorldPlay's released few-step inference does that).

Guidance: with ``guidance != 1`` every step also runs the *unconditional* branch, with its own cache,
and combines v = v_u + g·(v_c − v_u). "Unconditional" drops what the ``uncond_*`` switches say: the
text (a negative prompt embedding if one is given, otherwise no text tokens), the actions (id 0)
and the cameras (identity w2c for every latent, which PRoPE reads as "no relative camera"). The
conditioning image is always kept (image-to-video).

Everything later stages need comes out of the same loop: per chunk, the final latents (the clean
prediction x̂0 at the exit step), the context indices / positions used, optionally the whole
trajectory (x_σ, v, x̂0 per step) and gradients through a chosen step (``grad_step``, Self-Forcing's
random exit step) or through all steps (``keep_grad``). Stages that need the model on a chunk
outside the sampling loop (RL's NFT loss, a DMD score) build the same conditioning with
:meth:`Rollout.context` and call :meth:`Rollout.velocity`; :meth:`Rollout.extend` pushes a real
prefix into the history, :meth:`RolloutState.repeat_interleave` branches G candidates off one prefix.

The denoising loop does no host synchronisation: memory selection, gathers and σ values stay on
the device (the σ schedule and the overlap point table are copied to a device once, on first use).
Seeded rollouts on GPU should use a generator on the latents' device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn

from data.geometry import invert_rigid
from models.flow import (
    add_noise, cfg_combine, euler_step, output_to_velocity, output_to_x0, prediction_of, sampling_sigmas,
)
from models.layout import Layout, chunk_layout, pin_image, teacher_layout
from models.memory import MemoryConfig

__all__ = [
    "RolloutConfig",
    "Rollout",
    "RolloutState",
    "ChunkContext",
    "ChunkRecord",
    "Trajectory",
    "RolloutResult",
    "NoiseFn",
    "gaussian_noise",
]


@dataclass
class RolloutConfig:
    """How video is sampled (bundles store it as their sampling defaults)."""

    chunk_size: int = 4  # latents per AR chunk (must equal memory.chunk_size)
    steps: int = 50  # Euler steps ("euler" schedule); "distilled" always takes 4
    shift: float = 5.0  # timestep shift of the Euler schedule
    schedule: str = "euler"  # "euler" | "distilled"
    renoise: bool | None = None  # re-noise x̂0 between steps; None = True for "distilled", False for "euler"
    guidance: float = 1.0  # CFG scale; 1 = conditional only (no second branch)
    uncond_text: bool = True  # the unconditional branch drops the text (negative prompt or none)
    uncond_actions: bool = True  # ... sets every action to 0
    uncond_cameras: bool = True  # ... sets every w2c to the identity
    context_sigma: float = 0.0  # noise-level tag of the cached (clean) context latents; WorldPlay: 0.014
    context_causal: bool = True  # block-causal attention inside the context when filling the cache
    detach_context: bool = True  # cached context (and text) K/V carry no gradient (Self-Forcing)
    reuse_context: bool = True  # keep K/V of leading context chunks unchanged since the last chunk (exact; no-grad fills)
    mode: str = "ar"  # "ar" | "window"
    window_latents: int = 16  # window length in "window" mode (multiple of chunk_size)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.chunk_size < 1:
            raise ValueError(f"RolloutConfig.chunk_size must be >= 1, got {self.chunk_size}")
        if self.memory.chunk_size != self.chunk_size:
            raise ValueError(
                f"RolloutConfig.memory.chunk_size={self.memory.chunk_size} must equal chunk_size={self.chunk_size}"
            )
        if self.schedule not in ("euler", "distilled"):
            raise ValueError(f"RolloutConfig.schedule must be 'euler' or 'distilled', got {self.schedule!r}")
        if self.schedule == "euler" and self.steps < 1:
            raise ValueError(f"RolloutConfig.steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"RolloutConfig.shift must be > 0, got {self.shift}")
        if not 0.0 <= self.context_sigma < 1.0:
            raise ValueError(f"RolloutConfig.context_sigma must lie in [0, 1), got {self.context_sigma}")
        if self.mode not in ("ar", "window"):
            raise ValueError(f"RolloutConfig.mode must be 'ar' or 'window', got {self.mode!r}")
        if self.window_latents < 1 or self.window_latents % self.chunk_size:
            raise ValueError(
                f"RolloutConfig.window_latents={self.window_latents} must be a positive multiple of "
                f"chunk_size={self.chunk_size}"
            )

    @property
    def use_renoise(self) -> bool:
        return self.schedule == "distilled" if self.renoise is None else self.renoise

    @property
    def unit(self) -> int:
        """Latents generated per step() call: a chunk (ar) or a window (window)."""
        return self.chunk_size if self.mode == "ar" else self.window_latents


class NoiseFn(Protocol):
    """Per-step noise hook: ``step`` 0 is a chunk's initial noise, ``step`` k > 0 the re-noise to σ_k."""

    def __call__(
        self, shape: tuple[int, ...], *, generator: torch.Generator | Sequence[torch.Generator] | None,
        device: torch.device, dtype: torch.dtype, chunk: int, step: int,
    ) -> Tensor: ...


def gaussian_noise(
    shape: tuple[int, ...], *, generator: torch.Generator | Sequence[torch.Generator] | None, device: torch.device,
    dtype: torch.dtype, chunk: int, step: int,
) -> Tensor:
    """Standard normal noise drawn from ``generator`` (on the generator's device, moved if needed).

    Pass a generator on the latents' device to keep GPU rollouts free of host copies. A sequence of
    generators, one per batch row, draws each row from its own: a row's noise then does not depend on
    which other rows share its batch (batched evaluation equals clip-by-clip generation).
    """
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"gaussian_noise: {len(generator)} generators for a batch of {shape[0]} rows")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(rows).to(device=device, dtype=dtype)
    gen_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


@dataclass
class Trajectory:
    """The denoising path of one chunk: per model call s, the input x_σ, σ, velocity v and x̂0.

    x, v, x0: [S, B, C, L, h, w]; sigma: [S]. Used by log-likelihood-free RL (NFT) and debugging.
    """

    x: Tensor
    sigma: Tensor
    v: Tensor
    x0: Tensor


@dataclass
class ChunkRecord:
    """What one step() produced: latents [B, C, L, h, w] (x̂0 at the exit step) and how they were made."""

    start: int  # index of the chunk's first latent in the video
    latents: Tensor
    context_idx: Tensor  # [B, M] sorted history indices of the context (M may be 0)
    context_pos: Tensor  # [B, M] reframed temporal positions of the context
    positions: Tensor  # [B, L] temporal positions of the new latents
    sigmas: Tensor  # [n + 1] the schedule
    exit_step: int  # index of the last model call (n - 1 unless stopped early)
    trajectory: Trajectory | None = None
    context_reused: int = 0  # leading context latents whose cached K/V were kept instead of re-encoded
    pinned: Tensor | None = None  # [B, L] bool: latents that are the conditioning image (never trained on)


@dataclass
class RolloutResult:
    """A whole rollout: latents [B, C, T, h, w] and one record per chunk (or window)."""

    latents: Tensor
    chunks: list[ChunkRecord]


@dataclass
class RolloutState:
    """Streaming state: the prompt, the conditioning image and the full history (latents and cameras)."""

    image_latent: Tensor | None  # [B, C, h, w]
    text: Tensor | None  # [B, L, D]
    text_mask: Tensor | None  # [B, L]
    neg_text: Tensor | None
    neg_text_mask: Tensor | None
    latents: Tensor  # [B, C, N, h, w] clean latents of the history
    actions: Tensor  # [B, N] int64
    w2c: Tensor  # [B, N, 4, 4]
    K: Tensor  # [B, N, 3, 3] normalised intrinsics
    chunks: list[ChunkRecord] = field(default_factory=list)
    caches: dict[str, Any] = field(default_factory=dict)  # per CFG branch, text K/V filled once
    context_keys: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # per branch: cached (idx, pos)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[2]

    @property
    def batch(self) -> int:
        return self.latents.shape[0]

    def repeat_interleave(self, n: int) -> "RolloutState":
        """A state with every batch element repeated ``n`` times (e.g. G RL candidates after one prefix)."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        return RolloutState(
            rep(self.image_latent), rep(self.text), rep(self.text_mask), rep(self.neg_text), rep(self.neg_text_mask),
            rep(self.latents), rep(self.actions), rep(self.w2c), rep(self.K), chunks=[], caches={},
        )

    def take(self, rows: Tensor) -> "RolloutState":
        """A state holding batch elements ``rows`` [n] (int64) of this one, with fresh caches (e.g. the RL
        candidates kept for training, each with its own history)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows.to(t.device))

        return RolloutState(
            pick(self.image_latent), pick(self.text), pick(self.text_mask), pick(self.neg_text), pick(self.neg_text_mask),
            pick(self.latents), pick(self.actions), pick(self.w2c), pick(self.K), chunks=[], caches={},
        )


@dataclass
class ChunkContext:
    """Everything a new chunk (or window) is conditioned on; built once and reused by every step.

    In ``ar`` mode the context lives in ``caches`` (one per CFG branch); in ``window`` mode the
    gathered context tensors are kept and concatenated in front of the window at every call.
    """

    start: int
    layout: Layout  # [context | new] slots, built by models.layout (the layout training uses)
    actions: Tensor  # [B, L] of the new latents
    w2c: Tensor
    K: Tensor
    pinned: Tensor | None  # [B, L] bool: new latents that are the conditioning image (None: no image)
    caches: dict[str, Any] = field(default_factory=dict)
    window_context: dict[str, Tensor] | None = None  # window mode: x, sigma, actions, w2c, K, t_pos, cond_mask
    reused: int = 0  # context latents kept from the previous fill (the smallest over branches)

    @property
    def positions(self) -> Tensor:
        """[B, L] temporal positions of the new latents."""
        return self.layout.new_pos

    @property
    def context_idx(self) -> Tensor:
        return self.layout.context_idx

    @property
    def context_pos(self) -> Tensor:
        return self.layout.context_pos

    @property
    def cond_mask(self) -> Tensor | None:
        """[B, L] latents that get the image in the conditioning channels (the pinned ones)."""
        return self.pinned

    def repeat_interleave(self, n: int) -> "ChunkContext":
        """This context for ``n`` copies of every batch element (a state branched with
        :meth:`RolloutState.repeat_interleave`): layout, conditioning and filled caches repeated, so G RL
        candidates are sampled from one context fill instead of G."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        layout = Layout(rep(self.layout.indices), rep(self.layout.positions), self.layout.num_context)
        window = None if self.window_context is None else {k: rep(v) for k, v in self.window_context.items()}
        return ChunkContext(self.start, layout, rep(self.actions), rep(self.w2c), rep(self.K), rep(self.pinned),
                            {b: c.repeat_interleave(n) for b, c in self.caches.items()}, window, self.reused)


class Rollout:
    """Samples video from a WorldDiT-like model with memory; see the module docstring.

    ``model`` must provide ``forward(x, sigma, *, actions, w2c, K, t_pos, text, text_mask,
    image_latent, cond_mask, chunk_size, cache)``, ``new_cache()``, ``fill_text_cache`` and
    ``fill_context_cache`` (models/dit.py). ``noise_fn`` draws every noise tensor (default: Gaussian
    from the generator), in a fixed order, so a seeded generator gives a reproducible rollout.
    """

    def __init__(self, model: nn.Module, cfg: RolloutConfig, noise_fn: NoiseFn | None = None):
        cfg.validate()
        self.model = model
        self.cfg = cfg
        self.noise_fn = noise_fn or gaussian_noise
        self._sigmas: dict[torch.device, Tensor] = {}
        self._prediction: str | None = None

    # ------------------------------------------------------------------ schedule
    def sigmas(self, device: torch.device | str | None = None) -> Tensor:
        """The σ schedule [n + 1] (float32), from 1 down to 0; copied to each device once."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev not in self._sigmas:
            self._sigmas[dev] = sampling_sigmas(self.cfg.schedule, self.cfg.steps, self.cfg.shift).to(dev)
        return self._sigmas[dev]

    @property
    def num_steps(self) -> int:
        return 4 if self.cfg.schedule == "distilled" else self.cfg.steps

    # ------------------------------------------------------------------ streaming API
    def start(
        self,
        image_latent: Tensor | None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        neg_text: Tensor | None = None,
        neg_text_mask: Tensor | None = None,
        latent_shape: tuple[int, int, int, int] | None = None,
    ) -> RolloutState:
        """A fresh state with an empty history.

        image_latent [B, C, h, w] conditions latent 0 (image-to-video); without it pass
        ``latent_shape=(B, C, h, w)``. text [B, L, D] with text_mask [B, L] (bool, True = token);
        neg_text / neg_text_mask: the unconditional prompt embedding for guidance.
        """
        if image_latent is not None:
            if image_latent.ndim != 4:
                raise ValueError(f"image_latent must be [B, C, h, w], got {tuple(image_latent.shape)}")
            B, C, h, w = image_latent.shape
            ref = image_latent
        elif latent_shape is not None:
            B, C, h, w = latent_shape
            ref = torch.zeros((), device=self._device())
        else:
            raise ValueError("start: give image_latent [B, C, h, w] or latent_shape=(B, C, h, w)")
        named = (("text", text, 3), ("neg_text", neg_text, 3),
                 ("text_mask", text_mask, 2), ("neg_text_mask", neg_text_mask, 2))
        for name, t, nd in named:
            if t is not None and (t.ndim != nd or t.shape[0] != B):
                raise ValueError(f"{name} must have {nd} dims and batch {B}, got {tuple(t.shape)}")
        dev = ref.device
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        return RolloutState(
            image_latent, text, text_mask, neg_text, neg_text_mask,
            latents=torch.zeros(B, C, 0, h, w, device=dev, dtype=dtype),
            actions=torch.zeros(B, 0, dtype=torch.long, device=dev),
            w2c=torch.zeros(B, 0, 4, 4, device=dev),
            K=torch.zeros(B, 0, 3, 3, device=dev),
        )

    def extend(self, state: RolloutState, latents: Tensor, actions: Tensor, w2c: Tensor, K: Tensor) -> None:
        """Append given clean latents [B, C, L, h, w] and their cameras to the history (teacher forcing,
        e.g. a real-video prefix for distillation or a resumed session)."""
        self._check_cond(state, actions, w2c, K, what="extend")
        if latents.ndim != 5 or latents.shape[0] != state.batch or latents.shape[2] != actions.shape[1]:
            raise ValueError(
                f"extend: latents must be [B={state.batch}, C, L={actions.shape[1]}, h, w], got {tuple(latents.shape)}"
            )
        if latents.shape[1] != state.latents.shape[1] or latents.shape[3:] != state.latents.shape[3:]:
            raise ValueError(
                f"extend: latents {tuple(latents.shape)} do not match the history {tuple(state.latents.shape)}"
            )
        self._append(state, latents, actions, w2c, K)

    def set_prompt(
        self, state: RolloutState, text: Tensor | None, text_mask: Tensor | None = None,
        neg_text: Tensor | None = None, neg_text_mask: Tensor | None = None,
    ) -> None:
        """Switch the prompt mid-stream (promptable events): text K/V are re-cached at the next chunk."""
        state.text, state.text_mask, state.neg_text, state.neg_text_mask = text, text_mask, neg_text, neg_text_mask
        state.caches.clear()
        state.context_keys.clear()

    def context(self, state: RolloutState, actions: Tensor, w2c: Tensor, K: Tensor, layout: Layout | None = None) -> ChunkContext:
        """Select and reframe the memory for the next ``unit`` latents and fill the caches (ar) once.

        actions [B, L] int64, w2c [B, L, 4, 4], K [B, L, 3, 3] (normalised) of the new latents.
        layout: use these slots instead of selecting the memory (e.g. the Context-Forcing teacher's
        ``models.layout.aligned_layout``): [B, M + L], context indices in the history, then the next L latents.
        """
        cfg = self.cfg
        L = self._check_cond(state, actions, w2c, K, what="step")
        if L != cfg.unit:
            raise ValueError(
                f"step: {cfg.mode} mode generates {cfg.unit} latents per call "
                f"({'chunk_size' if cfg.mode == 'ar' else 'window_latents'}), got actions for {L}"
            )
        N, B, dev = state.num_latents, state.batch, state.latents.device
        c2w_past = invert_rigid(state.w2c.float())
        c2w_new = invert_rigid(w2c.float())
        if layout is not None:
            layout = self._given_layout(layout, N, B, L).to(dev)
        elif cfg.mode == "ar":
            layout = chunk_layout(c2w_past, c2w_new, cfg.memory)
        else:
            layout = self._window_layout(c2w_past, c2w_new)
        has_image = state.image_latent is not None
        M = layout.num_context
        pinned = layout.image_mask[:, M:] if has_image else None
        ctx = ChunkContext(N, layout, actions, w2c, K, pinned)

        g = layout.context_idx.to(dev)
        hist = state.latents
        x_ctx = hist.gather(2, g[:, None, :, None, None].expand(-1, hist.shape[1], -1, *hist.shape[3:]))
        if cfg.detach_context:
            x_ctx = x_ctx.detach()
        a_ctx = state.actions.gather(1, g)
        w_ctx = state.w2c.gather(1, g[..., None, None].expand(-1, -1, 4, 4))
        k_ctx = state.K.gather(1, g[..., None, None].expand(-1, -1, 3, 3))
        s_ctx = layout.sigmas(0.0, cfg.context_sigma)[:, :M]  # the clean tag; 0 on the image slot
        m_ctx = layout.image_mask[:, :M] if has_image else None
        ctx_idx, ctx_pos = layout.context_idx, layout.context_pos
        if cfg.mode == "window":
            ctx.window_context = dict(
                x=x_ctx, sigma=s_ctx, actions=a_ctx, w2c=w_ctx, K=k_ctx, t_pos=ctx_pos, cond_mask=m_ctx
            )
            return ctx

        grad = contextlib.nullcontext() if not cfg.detach_context else torch.no_grad()
        reused = []
        for branch in self._branches():
            cache = self._text_cache(state, branch)
            if M > 0:
                a_b, w_b = self._branch_cameras(branch, a_ctx, w_ctx)
                with grad:
                    reuse = self._reusable(state, branch, cache, ctx_idx, ctx_pos)
                    self.model.fill_context_cache(
                        cache, x=x_ctx, sigma=s_ctx, actions=a_b, w2c=w_b, K=k_ctx, t_pos=ctx_pos,
                        image_latent=state.image_latent, cond_mask=m_ctx, chunk_size=cfg.chunk_size,
                        causal=cfg.context_causal, **({"reuse": reuse} if reuse else {}),
                    )
                state.context_keys[branch] = (ctx_idx, ctx_pos)
                reused.append(reuse)
            else:
                self._clear_context(cache)
                state.context_keys.pop(branch, None)
            ctx.caches[branch] = cache
        ctx.reused = min(reused, default=0)
        return ctx

    def _reusable(self, state: RolloutState, branch: str, cache: Any, ctx_idx: Tensor, ctx_pos: Tensor) -> int:
        """Leading context latents, in whole chunks, that the branch's cache already holds as they are now.

        The history is append-only and each latent's conditioning fixed, so a latent with the same index
        and position as in the previous fill had the same inputs; with a block-causal context its keys/values
        depend only on the chunks before it. Off with autograd (cached K/V would join an old graph).
        One host sync per fill (the comparison).
        """
        cfg = self.cfg
        prev = state.context_keys.get(branch)
        if (not cfg.reuse_context or not cfg.context_causal or prev is None or torch.is_grad_enabled()
                or not hasattr(cache, "keep_context") or getattr(cache, "context_frames", 0) != prev[0].shape[-1]):
            return 0
        n = min(prev[0].shape[-1], ctx_idx.shape[-1])
        same = ((prev[0][:, :n] == ctx_idx[:, :n]) & (prev[1][:, :n] == ctx_pos[:, :n])).all(0)  # [n]
        lead = int(same.int().cumprod(0).sum())
        return lead - lead % cfg.chunk_size

    @property
    def prediction(self) -> str:
        """What the model's raw output means ("v" or "x0", models/flow.py)."""
        if self._prediction is None:
            self._prediction = prediction_of(self.model)
        return self._prediction

    def chunk_sigma(self, ctx: ChunkContext, sigma: Tensor | float, batch: int, length: int) -> Tensor:
        """σ [B, L] of the new latents: ``sigma`` (scalar or [B, L]) with 0 on the pinned image latent."""
        dev = ctx.actions.device
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=dev)
        sig = sig.expand(batch, length) if sig.ndim < 2 else sig
        if ctx.pinned is None:
            return sig
        return torch.where(ctx.pinned.to(dev), torch.zeros((), device=dev), sig)

    def output(self, state: RolloutState, ctx: ChunkContext, x: Tensor, sigma: Tensor) -> Tensor:
        """The model's raw guided output [B, C, L, h, w] for new latents x at σ [B, L] (see :meth:`chunk_sigma`).

        Guidance combines raw outputs: for fixed (x, σ) both readings (v and x0) are affine in the
        output, so combining either gives the same guided velocity and x̂0.
        """
        out = self._branch_output(state, ctx, "cond", x, sigma)
        if self.cfg.guidance != 1.0:
            out_u = self._branch_output(state, ctx, "uncond", x, sigma)
            out = cfg_combine(out, out_u, self.cfg.guidance)
        return out

    def predict(self, state: RolloutState, ctx: ChunkContext, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """Guided (velocity, x̂0), each [B, C, L, h, w], of the new latents x at σ (scalar or [B, L]).

        The model's output is read through its prediction parameterisation (models/flow.py); the
        pinned image latent comes out as the image exactly, with zero velocity.
        """
        B, _, L = x.shape[:3]
        sig = self.chunk_sigma(ctx, sigma, B, L)
        x = pin_image(x, ctx.pinned, state.image_latent) if ctx.pinned is not None else x
        out = self.output(state, ctx, x, sig)
        x0 = output_to_x0(out, x, sig, self.prediction)
        v = output_to_velocity(out, x, sig, self.prediction)
        if ctx.pinned is not None:
            x0 = pin_image(x0, ctx.pinned, state.image_latent)
            v = torch.where(ctx.pinned.to(v.device)[:, None, :, None, None], torch.zeros((), device=v.device, dtype=v.dtype), v)
        return v, x0

    def velocity(self, state: RolloutState, ctx: ChunkContext, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Guided velocity [B, C, L, h, w] of the new latents x at noise level sigma (scalar or [B, L])."""
        return self.predict(state, ctx, x, sigma)[0]

    def step(
        self,
        state: RolloutState,
        actions: Tensor,
        w2c: Tensor,
        K: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        keep_grad: bool = False,
        grad_step: int | None = None,
        exit_step: int | None = None,
        return_trajectory: bool = False,
        commit: bool = True,
        context: ChunkContext | None = None,
    ) -> ChunkRecord:
        """Generate the next chunk (ar) or window (window) and, if ``commit``, append it to the history.

        keep_grad: every model call keeps its graph. grad_step s: calls before s run under no_grad,
        call s (and any later call up to the exit) keep their graph; the chunk then stops at s
        unless ``exit_step`` says otherwise (Self-Forcing's random exit step). exit_step s: stop
        after model call s and return its clean prediction. context: a ChunkContext for these latents built
        already (:meth:`context`, :meth:`ChunkContext.repeat_interleave`) instead of filling one now.
        Returns the chunk's record.
        """
        n = self.num_steps
        if grad_step is not None and not 0 <= grad_step < n:
            raise ValueError(f"grad_step must lie in [0, {n}), got {grad_step}")
        if exit_step is None:
            exit_step = grad_step if grad_step is not None else n - 1
        if not 0 <= exit_step < n:
            raise ValueError(f"exit_step must lie in [0, {n}), got {exit_step}")
        if grad_step is not None and grad_step > exit_step:
            raise ValueError(f"grad_step={grad_step} comes after exit_step={exit_step}: no call would keep gradients")

        if context is not None:  # a context filled already (e.g. once for G candidates: ChunkContext.repeat_interleave)
            if context.start != state.num_latents or context.actions.shape != actions.shape:
                raise ValueError(f"step: the given context is for latents from {context.start} with actions "
                                 f"{tuple(context.actions.shape)}; the state has {state.num_latents} latents, actions {tuple(actions.shape)}")
            ctx = context
        else:
            ctx = self.context(state, actions, w2c, K)
        ref = state.latents
        B, C, _, h, w = ref.shape
        L = actions.shape[1]
        chunk_index = len(state.chunks)
        sig = self.sigmas(ref.device)

        def noise(step: int) -> Tensor:
            return self.noise_fn(
                (B, C, L, h, w), generator=generator, device=ref.device, dtype=ref.dtype, chunk=chunk_index, step=step
            )

        x = noise(0)
        if ctx.pinned is not None:  # the image latent enters clean (σ = 0), as in training
            x = pin_image(x, ctx.pinned, state.image_latent)
        xs, vs, x0s = [], [], []
        for k in range(exit_step + 1):
            with torch.set_grad_enabled(keep_grad or (grad_step is not None and k >= grad_step)):
                s_k = self.chunk_sigma(ctx, sig[k], B, L)
                v, x0 = self.predict(state, ctx, x, s_k)
                if return_trajectory:
                    xs.append(x)
                    vs.append(v)
                    x0s.append(x0)
                if k == exit_step:
                    break
                s_next = self.chunk_sigma(ctx, sig[k + 1], B, L)
                if self.cfg.use_renoise:
                    x = add_noise(x0, noise(k + 1), s_next)
                else:
                    x = euler_step(x, v, s_k, s_next)
        traj = None
        if return_trajectory:
            traj = Trajectory(torch.stack(xs), sig[: exit_step + 1], torch.stack(vs), torch.stack(x0s))
        record = ChunkRecord(ctx.start, x0, ctx.context_idx, ctx.context_pos, ctx.positions, sig, exit_step, traj,
                             context_reused=ctx.reused, pinned=ctx.pinned)
        if self.cfg.mode == "ar" and (keep_grad or grad_step is not None):
            # Calls that kept a graph read this chunk's caches, and activation checkpointing re-runs them in
            # backward: the next chunk must not refill those cache objects, so it gets fresh ones.
            state.caches.clear()
            state.context_keys.clear()
        if commit:
            self._append(state, x0, actions, w2c, K)
            state.chunks.append(record)
        return record

    def generate(
        self,
        image_latent: Tensor | None,
        actions: Tensor,
        w2c: Tensor,
        K: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        neg_text: Tensor | None = None,
        neg_text_mask: Tensor | None = None,
        latent_shape: tuple[int, int, int, int] | None = None,
        keep_grad: bool = False,
        grad_step: int | Sequence[int | None] | None = None,
        exit_step: int | Sequence[int | None] | None = None,
        return_trajectory: bool = False,
    ) -> RolloutResult:
        """Generate a whole trajectory of T latents: actions [B, T], w2c [B, T, 4, 4], K [B, T, 3, 3].

        T must be a multiple of chunk_size (ar) or window_latents (window). grad_step / exit_step
        may be one value for every chunk or a list with one entry per chunk.
        """
        T = actions.shape[-1] if actions.ndim == 2 else -1
        unit = self.cfg.unit
        if actions.ndim != 2 or T < unit or T % unit:
            what = "chunk_size" if self.cfg.mode == "ar" else "window_latents"
            raise ValueError(
                f"generate: {self.cfg.mode} mode needs a trajectory of k*{what} = k*{unit} latents (k >= 1: "
                f"{unit}, {2 * unit}, {3 * unit}, ...), got actions of shape {tuple(actions.shape)}"
            )
        n_chunks = T // unit
        grads = self._per_chunk(grad_step, n_chunks, "grad_step")
        exits = self._per_chunk(exit_step, n_chunks, "exit_step")
        state = self.start(
            image_latent, text, text_mask, neg_text=neg_text, neg_text_mask=neg_text_mask, latent_shape=latent_shape
        )
        for i in range(n_chunks):
            sl = slice(i * unit, (i + 1) * unit)
            self.step(
                state, actions[:, sl], w2c[:, sl], K[:, sl], generator,
                keep_grad=keep_grad, grad_step=grads[i], exit_step=exits[i], return_trajectory=return_trajectory,
            )
        return RolloutResult(torch.cat([c.latents for c in state.chunks], dim=2), state.chunks)

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _branches(self) -> tuple[str, ...]:
        return ("cond",) if self.cfg.guidance == 1.0 else ("cond", "uncond")

    def _branch_text(self, state: RolloutState, branch: str) -> tuple[Tensor | None, Tensor | None]:
        if branch == "uncond" and self.cfg.uncond_text:
            return state.neg_text, state.neg_text_mask
        return state.text, state.text_mask

    def _branch_cameras(self, branch: str, actions: Tensor, w2c: Tensor) -> tuple[Tensor, Tensor]:
        if branch == "uncond":
            if self.cfg.uncond_actions:
                actions = torch.zeros_like(actions)
            if self.cfg.uncond_cameras:
                w2c = torch.eye(4, device=w2c.device, dtype=w2c.dtype).expand_as(w2c)
        return actions, w2c

    def _text_cache(self, state: RolloutState, branch: str) -> Any:
        """The branch's cache, created and filled with its text K/V on first use (once per prompt)."""
        if branch not in state.caches:
            cache = self.model.new_cache()
            text, mask = self._branch_text(state, branch)
            if text is not None:
                with torch.no_grad() if self.cfg.detach_context else contextlib.nullcontext():
                    self.model.fill_text_cache(cache, text, mask)
            state.caches[branch] = cache
        return state.caches[branch]

    def _clear_context(self, cache: Any) -> None:
        clear = getattr(cache, "clear_context", None)
        if clear is not None:
            clear()

    def _branch_output(self, state: RolloutState, ctx: ChunkContext, branch: str, x: Tensor, sigma: Tensor) -> Tensor:
        actions, w2c = self._branch_cameras(branch, ctx.actions, ctx.w2c)
        if self.cfg.mode == "ar":
            return self.model(
                x, sigma, actions=actions, w2c=w2c, K=ctx.K, t_pos=ctx.positions, text=None, text_mask=None,
                image_latent=state.image_latent, cond_mask=ctx.cond_mask, chunk_size=self.cfg.chunk_size,
                cache=ctx.caches[branch],
            )
        wc = ctx.window_context
        M = wc["x"].shape[2]
        a_ctx, w_ctx = self._branch_cameras(branch, wc["actions"], wc["w2c"])
        text, mask = self._branch_text(state, branch)
        cm = None if ctx.cond_mask is None else torch.cat([wc["cond_mask"], ctx.cond_mask], dim=1)
        v = self.model(
            torch.cat([wc["x"].to(x.dtype), x], dim=2), torch.cat([wc["sigma"], sigma.to(wc["sigma"].dtype)], dim=1),
            actions=torch.cat([a_ctx, actions], dim=1), w2c=torch.cat([w_ctx, w2c.to(w_ctx.dtype)], dim=1),
            K=torch.cat([wc["K"], ctx.K.to(wc["K"].dtype)], dim=1),
            t_pos=torch.cat([wc["t_pos"], ctx.positions], dim=1),
            text=text, text_mask=mask, image_latent=state.image_latent, cond_mask=cm, chunk_size=None, cache=None,
        )
        return v[:, :, M:]

    @staticmethod
    def _given_layout(layout: Layout, N: int, B: int, L: int) -> Layout:
        """A caller's layout checked against the history (N latents) and the new unit (B x L latents), on its own
        device (a layout built on the host is checked without a device sync)."""
        if layout.batch != B or layout.num_new != L:
            raise ValueError(f"context: the given layout is [{layout.batch}, {layout.num_context} + {layout.num_new}], "
                             f"expected batch {B} and {L} new latents")
        new = torch.arange(N, N + L, device=layout.indices.device).expand(B, L)
        ctx = layout.context_idx
        if not torch.equal(layout.new_idx, new) or (ctx.numel() and (int(ctx.min()) < 0 or int(ctx.max()) >= N)):
            raise ValueError(f"context: the given layout's new slots must be latents {N}..{N + L - 1} and its context "
                             f"indices must lie in the history [0, {N})")
        return layout

    def _window_layout(self, c2w_past: Tensor, c2w_new: Tensor) -> Layout:
        """Per-sample teacher layouts stacked [B, M + W]; samples must agree on M (the union size depends on poses)."""
        lays = [teacher_layout(c2w_past[b], c2w_new[b], self.cfg.memory) for b in range(c2w_past.shape[0])]
        sizes = sorted({lay.num_context for lay in lays})
        if len(sizes) > 1:
            raise ValueError(
                f"window mode: the batch's memories have different sizes {sizes} (the union of retrieved "
                "chunks depends on each trajectory); roll such trajectories out with batch size 1"
            )
        return Layout(torch.cat([lay.indices for lay in lays]), torch.cat([lay.positions for lay in lays]), sizes[0])

    def _check_cond(self, state: RolloutState, actions: Tensor, w2c: Tensor, K: Tensor, what: str) -> int:
        B = state.batch
        if actions.ndim != 2 or actions.shape[0] != B:
            raise ValueError(f"{what}: actions must be [B={B}, L] int64, got {tuple(actions.shape)}")
        L = actions.shape[1]
        if actions.dtype != torch.long:
            raise ValueError(f"{what}: actions must be int64 action ids, got {actions.dtype}")
        if w2c.shape != (B, L, 4, 4):
            raise ValueError(f"{what}: w2c must be [B={B}, L={L}, 4, 4], got {tuple(w2c.shape)}")
        if K.shape != (B, L, 3, 3):
            raise ValueError(f"{what}: K must be [B={B}, L={L}, 3, 3] (normalised intrinsics), got {tuple(K.shape)}")
        return L

    def _append(self, state: RolloutState, latents: Tensor, actions: Tensor, w2c: Tensor, K: Tensor) -> None:
        state.latents = torch.cat([state.latents, latents.to(state.latents.dtype)], dim=2)
        state.actions = torch.cat([state.actions, actions.to(state.actions.device)], dim=1)
        state.w2c = torch.cat([state.w2c, w2c.to(state.w2c)], dim=1)
        state.K = torch.cat([state.K, K.to(state.K)], dim=1)

    @staticmethod
    def _per_chunk(value: int | Sequence[int | None] | None, n: int, name: str) -> list[int | None]:
        if value is None or isinstance(value, int):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"generate: {name} has {len(value)} entries for {n} chunks")
        return value
