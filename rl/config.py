"""Typed configuration of the WorldCompass RL stage (``stage=rl``), with the defaults of
``research/rl_distill.md`` §6 (WorldCompass's released recipe, the NFT update corrected).

The optimiser is the run's ``optim`` group (WorldCompass: Muon + AdamW, lr 1e-5, wd 1e-4, grad clip 2)
and gradient accumulation is ``trainer.grad_accum`` (2); everything RL-specific lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eval.actions import ActionAccuracyConfig
from eval.camera import PoseEstimatorConfig
from eval.protocols.config import WalkConfig

__all__ = [
    "CURRICULA",
    "STD_TYPES",
    "PathConfig",
    "ActionRewardConfig",
    "GeometryRewardConfig",
    "DriftRewardConfig",
    "RevisitRewardConfig",
    "LearnedRewardConfig",
    "RewardsConfig",
    "RLStageConfig",
    "RL_STAGE_CONFIGS",
]

CURRICULA = ("min2max", "max2min", "random")
STD_TYPES = ("global", "group", "group_max")
PATH_KINDS = ("random", "revisit", "mixed")
ALT_PATHS = ("still", "random")


def _check(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {problem}")


def _walk() -> WalkConfig:
    # WorldCompass holds each sampled action for 2-16 latents, weighted toward composites.
    return WalkConfig(segment_min=2, segment_max=16, w_move=0.2, w_rotate=0.2, w_move_rotate=0.4, w_rotate_rotate=0.15, w_still=0.05)


@dataclass
class PathConfig:
    """Camera paths of the rollouts and the start images they begin from.

    Start clips are the first ``num_clips`` clips of any dataset in the clip contract. A clip whose
    synthetic scene verifies gets the synthetic world's own collision-free planner (its starts are
    fresh free poses in that scene, rendered exactly); any other clip starts from its first frame
    and pose with WorldCompass-style random composite actions (``walk``). Both come from
    ``eval.protocols.walks.plan_path``: the paths the evaluation scores.
    """

    kind: str = "random"  # random | revisit (out and back: exercises memory) | mixed
    revisit_prob: float = 0.3  # mixed: share of revisit paths
    data: Optional[str] = None  # dataset of start clips; None = data.path
    num_clips: int = 64  # the first num_clips clips of the dataset are used as starts
    scene_match_psnr: float = 30.0  # a synthetic clip's scene must re-render its first frame this well
    alt_path: str = "still"  # the path not taken (exact-geometry reward): still (the camera stops) | random
    walk: WalkConfig = field(default_factory=_walk)

    def __post_init__(self) -> None:
        _check(self.kind in PATH_KINDS, "stage.paths.kind", f"{self.kind!r} is not one of {list(PATH_KINDS)}")
        _check(0.0 <= self.revisit_prob <= 1.0, "stage.paths.revisit_prob", f"must lie in [0, 1], got {self.revisit_prob}")
        _check(self.num_clips >= 1, "stage.paths.num_clips", f"must be >= 1, got {self.num_clips}")
        _check(self.alt_path in ALT_PATHS, "stage.paths.alt_path", f"{self.alt_path!r} is not one of {list(ALT_PATHS)}")
        self.walk.validate()


@dataclass
class ActionRewardConfig:
    """Action following: poses estimated on the generated frames (eval.camera), WorldCompass labels (eval.actions)."""

    score: str = "fine"  # which accuracy is the ``action`` score: fine (per-axis, WorldCompass's choice) | exact
    actions: ActionAccuracyConfig = field(default_factory=ActionAccuracyConfig)
    estimator: PoseEstimatorConfig = field(default_factory=PoseEstimatorConfig)

    def __post_init__(self) -> None:
        _check(self.score in ("fine", "exact"), "stage.rewards.action.score", f"must be 'fine' or 'exact', got {self.score!r}")


@dataclass
class GeometryRewardConfig:
    """Exact geometry on the synthetic world: PSNR against the true render of the commanded path."""

    psnr_cap: float = 50.0  # per-frame PSNR cap (dB): the true render scores exactly this
    alt_weight: float = 1.0  # dB subtracted per dB the candidate is closer to the path not taken than to its own


@dataclass
class DriftRewardConfig:
    """Quality drift anchored to frame 0: minus the weighted change of image statistics from the first frame."""

    sharpness: float = 1.0  # |delta log variance of the Laplacian|
    exposure: float = 1.0  # |delta mean luminance| (0..1)
    clipping: float = 1.0  # |delta share of clipped pixels (< 5 or > 250)|
    colourfulness: float = 1.0  # |delta Hasler-Suesstrunk colourfulness| / 100


@dataclass
class RevisitRewardConfig:
    """Revisit consistency: PSNR of a frame against the frame generated earlier at the identical pose."""

    psnr_cap: float = 50.0


@dataclass
class LearnedRewardConfig:
    """A learned reward loaded from a local path (never from a hub)."""

    name: str = ""  # the score's name (a key of ``stage.weights``)
    path: str = ""  # a TorchScript file, or a directory holding ``file``
    kind: str = "torchscript"  # torchscript | callable
    file: str = "model.pt"  # torchscript: the file inside ``path`` when ``path`` is a directory
    # callable: "package.module:function"; called as function(path, device) and returning a module or callable
    target: str = ""
    per: str = "frame"  # frame: called on frames [N, 3, H, W] in [0, 1] -> [N] | clip: on [R, L, 3, H, W] -> [R]
    batch_size: int = 64  # frames (or clips) per call

    def __post_init__(self) -> None:
        _check(self.kind in ("torchscript", "callable"), f"stage.rewards.learned[{self.name}].kind", f"must be torchscript or callable, got {self.kind!r}")
        _check(self.per in ("frame", "clip"), f"stage.rewards.learned[{self.name}].per", f"must be frame or clip, got {self.per!r}")
        _check(bool(self.name), "stage.rewards.learned", "every learned reward needs a name")


@dataclass
class RewardsConfig:
    """The reward models; which of their scores are used is ``stage.weights``."""

    action: ActionRewardConfig = field(default_factory=ActionRewardConfig)
    geometry: GeometryRewardConfig = field(default_factory=GeometryRewardConfig)
    drift: DriftRewardConfig = field(default_factory=DriftRewardConfig)
    revisit: RevisitRewardConfig = field(default_factory=RevisitRewardConfig)
    learned: list[LearnedRewardConfig] = field(default_factory=list)
    workers: int = 4  # thread pool for CPU-bound rewards (pose estimation) and path planning


@dataclass
class RLStageConfig:
    """WorldCompass RL (rl_distill.md §1, §6): clip-level group rollouts, world rewards, the DiffusionNFT update.

    The policy and its autoencoder, text encoder and sampler come from the ``init`` bundle (architecture
    and sampling section); only the run-time switches of ``model`` (attn_backend, grad_checkpointing,
    fuse) apply.
    """

    name: str = "rl"
    # ---- rollouts ----
    num_candidates: int = 12  # G: candidates of the target chunk per group
    groups_per_step: int = 1  # groups (start image + path + prefix) per rank per step
    rollout_steps: Optional[int] = 40  # Euler ODE steps of the rollouts; None = the bundle's
    shift: Optional[float] = 5.0  # schedule shift of the rollouts; None = the bundle's
    window_latents: int = 64  # longest path (latents): target chunks range over 1..window_latents / chunk
    min_chunk: int = 1  # first target chunk of the curriculum (1 = the chunk holding the image)
    curriculum: str = "min2max"  # min2max | max2min | random
    decode_pad: int = 2  # latents decoded before the target chunk (causal VAEs need a warm-up; stride-1 autoencoders use 1)
    # ---- advantages (computed by the trainer, not the rewards) ----
    # reward score -> weight (WorldCompass: fine action accuracy 2, quality drift 1). Weight 0 switches a score
    # off (experiments merge into this dict); list scores in log_scores to compute and log them without training on them.
    weights: dict[str, float] = field(default_factory=lambda: {"action": 2.0, "drift": 1.0})
    log_scores: list[str] = field(default_factory=list)
    std_type: str = "global"  # global (all groups, all ranks) | group | group_max
    bestofn: int = 6  # keep the top and bottom bestofn/2 of each group (>= G keeps all)
    adv_clip: float = 2.0  # advantages clipped to +-adv_clip, then r = A / (2 adv_clip) + 1/2
    # ---- the NFT update ----
    beta: float = 1.0  # v+ = beta v + (1 - beta) sg(v_old), v- = (1 + beta) sg(v_old) - beta v
    train_timestep_fraction: float = 0.5  # share of the sampler's sigma levels trained per candidate
    train_batch: int = 1  # kept candidates per micro-batch (trainer.grad_accum micro-batches per optimizer step)
    adaptive_weight: bool = True  # divide each sample's loss by sg(mean |x0_hat - x0|)
    kl_weight: float = 0.0  # >0: + kl_weight |v - v_ref|^2 against the init bundle (DiffusionNFT: 1e-4)
    # Reproduce the released WorldCompass code: v_old is overwritten by the current model's prediction, so the
    # update is (2r - 1) grad L+ (no trust region). For comparison only.
    official_overwrite: bool = False
    # ---- policies ----
    shadow_decay_start: float = 0.2  # rollout policy shadow: decay_k = min(max, start + rate * k), k = RL step
    shadow_decay_rate: float = 0.01
    shadow_decay_max: float = 0.9
    ckpt_ema_decay: float = 0.9  # the checkpoint EMA (exported, evaluated)
    # ---- paths, rewards ----
    paths: PathConfig = field(default_factory=PathConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    # ---- evaluation (the sample hook every trainer.sample_every steps, and the before/after report) ----
    eval_groups: int = 4  # fixed paths, one sample each, scored chunk by chunk
    eval_chunks: int = 4  # chunks per evaluation path
    eval_seed: int = 1234
    time_split: bool = True  # log the step's time split (prefix, candidates, decode, reward, update); syncs the device per phase

    def __post_init__(self) -> None:
        w = "stage"
        _check(self.num_candidates >= 2, f"{w}.num_candidates", f"a group needs >= 2 candidates, got {self.num_candidates}")
        _check(self.groups_per_step >= 1, f"{w}.groups_per_step", f"must be >= 1, got {self.groups_per_step}")
        _check(self.rollout_steps is None or self.rollout_steps >= 1, f"{w}.rollout_steps", f"must be >= 1, got {self.rollout_steps}")
        _check(self.shift is None or self.shift > 0, f"{w}.shift", f"must be > 0, got {self.shift}")
        _check(self.window_latents >= 1 and self.min_chunk >= 1, f"{w}.window_latents/min_chunk", "must be >= 1")
        _check(self.curriculum in CURRICULA, f"{w}.curriculum", f"{self.curriculum!r} is not one of {list(CURRICULA)}")
        _check(self.decode_pad >= 0, f"{w}.decode_pad", f"must be >= 0, got {self.decode_pad}")
        _check(bool(self.weights), f"{w}.weights", "name at least one reward score")
        _check(sum(abs(v) for v in self.weights.values()) > 0, f"{w}.weights", f"all weights are zero: {dict(self.weights)}")
        _check(self.std_type in STD_TYPES, f"{w}.std_type", f"{self.std_type!r} is not one of {list(STD_TYPES)}")
        _check(self.bestofn >= 2, f"{w}.bestofn", f"must be >= 2 (one top, one bottom), got {self.bestofn}")
        _check(self.adv_clip > 0, f"{w}.adv_clip", f"must be > 0, got {self.adv_clip}")
        _check(self.beta > 0, f"{w}.beta", f"must be > 0, got {self.beta}")
        _check(0 < self.train_timestep_fraction <= 1, f"{w}.train_timestep_fraction", f"must lie in (0, 1], got {self.train_timestep_fraction}")
        _check(self.train_batch >= 1, f"{w}.train_batch", f"must be >= 1, got {self.train_batch}")
        _check(self.kl_weight >= 0, f"{w}.kl_weight", f"must be >= 0, got {self.kl_weight}")
        for k in ("shadow_decay_start", "shadow_decay_max", "ckpt_ema_decay"):
            _check(0 <= getattr(self, k) < 1, f"{w}.{k}", f"must lie in [0, 1), got {getattr(self, k)}")
        _check(self.shadow_decay_rate >= 0, f"{w}.shadow_decay_rate", f"must be >= 0, got {self.shadow_decay_rate}")
        _check(self.eval_groups >= 0 and self.eval_chunks >= 1, f"{w}.eval_groups/eval_chunks", "eval_groups >= 0, eval_chunks >= 1")

    @property
    def trained_weights(self) -> dict[str, float]:
        """The scores trained on (non-zero weight)."""
        return {k: float(v) for k, v in self.weights.items() if v != 0}

    @property
    def score_names(self) -> list[str]:
        """Every score computed: the trained ones, then the logged-only ones."""
        return list(dict.fromkeys([*self.trained_weights, *self.log_scores]))

    def shadow_decay(self, k: int) -> float:
        """Decay of the rollout policy shadow after RL step k: min(max, start + rate * k) (WorldCompass)."""
        return min(self.shadow_decay_max, self.shadow_decay_start + self.shadow_decay_rate * k)


RL_STAGE_CONFIGS = {"rl": RLStageConfig}  # registered as stage=rl by configs/schema.py
