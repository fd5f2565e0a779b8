"""Typed configs of the distillation stages (``stage=ode_init``, ``stage=distill``), registered with Hydra.

Both extend :class:`train.stages.flow_stage.FlowStageConfig` (the student is a flow-matching WorldDiT
with an EMA, initialised from ``init``, sampled and exported by the flow stage's code); only the keys
below are new. Hyperparameter sources: research/worldplay.md §6.4 and research/rl_distill.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from models.flow import DISTILLED_SIGMAS
from train.stages.flow_stage import FlowStageConfig

TEACHER_CONTEXTS = ("aligned", "window", "none")
TEACHER_DTYPES = ("auto", "bfloat16", "float32")


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"stage.{key}: {problem}")


@dataclass
class OdeInitConfig(FlowStageConfig):
    """ODE initialisation of the 4-step student (CausVid / Causal Forcing; research/rl_distill.md §3.2, §3.6).

    The AR multi-step model (``teacher``, default: the ``init`` bundle) samples its own ODE trajectories
    through the inference sampler (Euler, its own memory), chunk by chunk after a real-video prefix; the
    states at the student's step levels and each chunk's final x0 are stored as shards of pairs
    (``pairs_dir``; one shard = ``data.batch_size`` rollouts = one training batch, written atomically,
    generation resumes shard by shard). The student then regresses x0 from the state at a random level
    per chunk, its context the clean history the teacher's chunk attended to.
    """

    name: str = "ode_init"
    loss_space: str = "x0"  # regress clean samples (CausVid); "v" reads the pair as a velocity target
    ema_decay: float = 0.99
    teacher: Optional[str] = None  # the AR multi-step bundle whose trajectories are regressed (None: ``init``)
    pairs_dir: Optional[str] = None  # where the pairs live (None: <run dir>/ode_pairs); may be shared by runs
    num_shards: int = 64  # shards of data.batch_size rollouts each
    rollout_chunks: int = 4  # chunks each rollout generates (the student's unit of self-rollout)
    chunks_per_step: int = 0  # chunks of a shard regressed per step, drawn at random (0: all of them)
    max_history_latents: int = 0  # real-video prefix before the rollout: U{0..max} latents, in whole chunks
    ode_steps: Optional[int] = None  # Euler steps of the teacher's sampler (None: its bundle's sampling.steps)
    ode_shift: Optional[float] = None  # its schedule shift (None: the bundle's)
    ode_guidance: Optional[float] = None  # its CFG scale (None: the bundle's)
    levels: list[float] = field(default_factory=lambda: list(DISTILLED_SIGMAS))  # the student's step levels
    pair_dtype: str = "float16"  # storage dtype of the trajectory states (history and targets stay float32)

    def __post_init__(self) -> None:
        _check(self.mode == "causal", "mode", f"the student is a block-causal AR model: mode must be 'causal', got {self.mode!r}")
        _check(self.num_shards >= 1, "num_shards", f"must be >= 1, got {self.num_shards}")
        _check(self.rollout_chunks >= 1, "rollout_chunks", f"must be >= 1, got {self.rollout_chunks}")
        _check(0 <= self.chunks_per_step <= self.rollout_chunks, "chunks_per_step",
               f"must lie in [0, rollout_chunks={self.rollout_chunks}], got {self.chunks_per_step}")
        _check(self.max_history_latents >= 0 and self.max_history_latents % self.chunk_size == 0, "max_history_latents",
               f"must be a non-negative multiple of chunk_size={self.chunk_size}, got {self.max_history_latents}")
        _check(bool(self.levels) and all(0.0 < s <= 1.0 for s in self.levels), "levels", f"need values in (0, 1], got {list(self.levels)}")
        _check(self.pair_dtype in ("float16", "bfloat16", "float32"), "pair_dtype", f"float16 | bfloat16 | float32, got {self.pair_dtype!r}")
        _check(self.ode_steps is None or self.ode_steps >= 1, "ode_steps", f"must be >= 1, got {self.ode_steps}")


@dataclass
class DistillConfig(FlowStageConfig):
    """Context Forcing (WorldPlay Alg. 1, research/worldplay.md §6.3) with Self-Forcing DMD as its baseline.

    Per step: the student rolls ``rollout_chunks`` chunks out through the inference sampler (4-step
    distilled schedule, KV cache, reconstituted memory) after a real-video history; the frozen
    bidirectional teacher (real score) and the fake score see those chunks as one window with the
    context ``teacher_context`` says; the fake score learns by flow matching on the student's samples
    every step (``loss_space``), the student by the DMD gradient every ``generator_every``-th step.
    """

    name: str = "distill"
    ema_decay: float = 0.99  # Self-Forcing: EMA 0.99 from step 200
    ema_start: int = 200
    teacher: Optional[str] = None  # the bidirectional memory teacher bundle (stage=midtrain stage.mode=bidirectional)
    # aligned: Context Forcing (the union of the student's chunk memories minus the window);
    # window: the teacher sees the generated window alone (misaligned memory, WorldPlay Fig. 8a);
    # none: memory-less Self-Forcing (no real history: rollouts start at the image, teacher on the window).
    teacher_context: str = "aligned"
    rollout_chunks: int = 4  # chunks per self-rollout = one teacher window (teacher sampling.window_latents)
    # [from_step, max_history_latents] pairs: the real history before the rollout is U{0..max} latents in whole
    # chunks, the max growing over training (WorldPlay's progressive curriculum; its schedule is not published).
    history_curriculum: list[list[int]] = field(default_factory=lambda: [[0, 8], [200, 16], [500, 32], [1000, 64]])
    exit_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # exit step drawn per rollout from these
    generator_every: int = 5  # critic (fake-score) steps per generator step (dfake_gen_update_ratio)
    fake_lr_scale: float = 0.2  # fake-score lr = optim.lr x this (paper 1e-6 / 2e-7; Self-Forcing 2e-6 / 4e-7)
    # CFG scale of the real score in the standard convention x0_u + g (x0_c - x0_u): 1 = conditional only.
    # Self-Forcing's "guidance_scale 3.0" is g = 4.0 here. None: the teacher bundle's sampling.guidance.
    real_guidance: Optional[float] = None
    dmd_shift: float = 5.0  # the DMD noise level: sigma = shift(u), u ~ U[0, 1), clamped to [min, max]
    dmd_sigma_min: float = 0.02
    dmd_sigma_max: float = 0.98
    teacher_dtype: str = "auto"  # frozen teacher weights: auto = bfloat16 on CUDA, float32 on CPU
    time_split: bool = True  # log time/* per phase (synchronises the device at phase boundaries)

    def __post_init__(self) -> None:
        _check(self.mode == "causal", "mode", f"the student is a block-causal AR model: mode must be 'causal', got {self.mode!r}")
        _check(self.teacher_context in TEACHER_CONTEXTS, "teacher_context", f"one of {TEACHER_CONTEXTS}, got {self.teacher_context!r}")
        _check(self.rollout_chunks >= 1, "rollout_chunks", f"must be >= 1, got {self.rollout_chunks}")
        _check(bool(self.exit_steps) and all(0 <= s < 4 for s in self.exit_steps), "exit_steps",
               f"need model-call indices of the 4-step schedule in [0, 3], got {list(self.exit_steps)}")
        _check(self.generator_every >= 1, "generator_every", f"must be >= 1, got {self.generator_every}")
        _check(self.fake_lr_scale > 0, "fake_lr_scale", f"must be > 0, got {self.fake_lr_scale}")
        _check(self.real_guidance is None or self.real_guidance > 0, "real_guidance", f"must be > 0, got {self.real_guidance}")
        _check(0.0 < self.dmd_sigma_min <= self.dmd_sigma_max < 1.0, "dmd_sigma_min/max",
               f"need 0 < min <= max < 1, got {self.dmd_sigma_min}, {self.dmd_sigma_max}")
        _check(self.dmd_shift > 0, "dmd_shift", f"must be > 0, got {self.dmd_shift}")
        _check(self.teacher_dtype in TEACHER_DTYPES, "teacher_dtype", f"one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        for entry in self.history_curriculum:
            _check(len(entry) == 2 and entry[0] >= 0 and entry[1] >= 0 and entry[1] % self.chunk_size == 0, "history_curriculum",
                   f"entries are [from_step, max_latents] with max_latents a multiple of chunk_size={self.chunk_size}, got {entry}")


DISTILL_STAGE_CONFIGS = {"ode_init": OdeInitConfig, "distill": DistillConfig}

__all__ = ["OdeInitConfig", "DistillConfig", "DISTILL_STAGE_CONFIGS", "TEACHER_CONTEXTS"]
