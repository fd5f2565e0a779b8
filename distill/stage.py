"""Stages ``ode_init`` and ``distill``: a 4-step, memory-aware AR student (research/worldplay.md §6).

``stage=ode_init`` (``init=<AR multi-step bundle>``): the AR model's own ODE trajectories, sampled
through the inference sampler after real-video prefixes, are stored at the student's step levels
(``distill.ode_pairs``); the student (a copy of the AR model) regresses each chunk's final x0 from
its state at a per-chunk random level, its context the clean history the teacher's chunk attended to,
block-causal as the sampler runs it.

``stage=distill`` (``init=<ode_init bundle>``, ``stage.teacher=<bidirectional memory teacher>``):
Algorithm 1 of WorldPlay with Self-Forcing's DMD. Roles: ``student`` (AR, EMA), ``teacher`` (the
frozen real score, bf16 on GPU), ``fake_score`` (initialised from the teacher, trained by flow
matching on the student's samples). Every step, the critic phase: a no-grad self-rollout
(:func:`distill.self_rollout.self_rollout`: a real history of j latents, j ~ U{0..m} in chunks with a
curriculum growing m, then 4 chunks through the inference sampler with a random exit step), the fake
score's flow loss on those chunks as one window with the teacher context; every ``generator_every``-th
step first the generator phase: the same rollout with the graph kept through each chunk's exit step,
real and fake x̂0 at one random noise level per sample, the DMD loss (``distill.dmd``). The teacher
context is ``stage.teacher_context``: aligned | window | none (the ablation is one override).

Both export a bundle whose sampling section is the 4-step ``distilled`` schedule (guidance 1: the
real score's guidance is distilled in), with lineage to the parent (``init``) and, for ``distill``,
the teacher.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from distill.config import DistillConfig, OdeInitConfig
from distill.dmd import dmd_loss, dmd_sigma
from distill.ode_pairs import PairShards, PairSpec, first_item, generate_pairs
from distill.self_rollout import SamplerView, SelfRollout, group_layouts, prefix_state, self_rollout, teacher_layouts
from models.bundle import load_bundle, worlddit_factory
from models.flow import add_noise, prediction_loss, prediction_of
from models.layout import Layout, check_trained_span, pin_image, position_span
from models.rollout import Rollout, RolloutConfig
from models.sampling import split_sampling
from train.data import build_dataset, collate_windows
from train.resumable import ResumableLoader
from train.stage import Role, StageContext, StepOutput, register_stage
from train.stages.flow_stage import FlowStage
from train.stages.inputs import clip_inputs, encode_video, layout_inputs, model_kwargs
from train.stages.midtrain import curriculum_length

__all__ = ["OdeInit", "Distill", "PhaseTimer", "RolloutPlan", "bundle_lineage"]


def bundle_lineage(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What a bundle's meta records about another bundle it was made from."""
    return {"path": str(Path(path).resolve()), **{k: meta.get(k) for k in ("stage", "step", "config_hash", "code_version", "created")}}


def amend_bundle_meta(bundle: Path, extra: dict[str, Any]) -> None:
    """Add keys to an exported bundle's meta.json (atomically; the weights and their checksums are untouched)."""
    from train.checkpoint import write_text_atomic

    path = Path(bundle) / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(extra)
    write_text_atomic(path, json.dumps(meta, indent=2) + "\n")


class PhaseTimer:
    """Wall time per phase of a step (``time/<phase>`` metrics, seconds); synchronises CUDA at phase boundaries."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def outer(self, tag: str) -> Iterator[None]:
        """Time a block that contains ``<tag>_*`` phases; what they do not account for is ``<tag>_backward``."""
        if not self.enabled:
            yield
            return
        inner = lambda: sum(v for k, v in self.times.items() if k.startswith(f"{tag}_"))  # noqa: E731
        before = inner()
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            rest = time.perf_counter() - t0 - (inner() - before)
            self.times[f"{tag}_backward"] = self.times.get(f"{tag}_backward", 0.0) + rest

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        self.times = {}
        return out


class _Student(FlowStage):
    """What both stages share: a 4-step AR student from ``init``, its sampler, its positions, its bundle."""

    def _require_init(self) -> None:
        if not self.cfg.init:
            raise ValueError(f"stage={self.scfg.name}: the student starts from a parent bundle: pass init=<bundle>")

    def rollout_config(self) -> RolloutConfig:
        """The student's sampler: the run's sampling section with the 4-step distilled schedule, no guidance,
        detached context (what it is trained as and exported with)."""
        return replace(super().rollout_config(), schedule="distilled", guidance=1.0, detach_context=True, mode="ar")

    def sequence_length(self) -> Optional[int]:
        """The student's layouts reach positions 0..max_context + chunk - 1, as the AR sampler does."""
        r = self.rollout_config()
        return position_span(r.memory, r.chunk_size)

    def _check_student(self) -> RolloutConfig:
        r = self.rollout_config()
        if r.chunk_size != self.scfg.chunk_size:
            raise ValueError(f"sampling.chunk_size={r.chunk_size} must equal stage.chunk_size={self.scfg.chunk_size}")
        # the student must not be asked for positions its parent never trained on
        check_trained_span(r.memory, r.chunk_size, "ar", self.parent_positions, f"stage={self.scfg.name} (parent {self.cfg.init})")
        return r

    def bundle_sampling(self) -> dict[str, Any]:
        s = super().bundle_sampling()
        s.update(schedule="distilled", steps=4, guidance=1.0, detach_context=True, mode="ar")
        return s

    def text(self, captions: list[str]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Text tokens [B, L, D] and mask [B, L] of captions, or (None, None) when the model takes no text."""
        if self.model_cfg.text_dim <= 0 or self.text_encoder.dim == 0 or self.cfg.text_encoder.kind == "none":
            return None, None
        tokens, mask = self.text_encoder.encode(captions)
        return tokens.to(self.device), mask.to(self.device)

    def _tokens(self, batch: int, latents: int, h: int, w: int) -> int:
        p = self.model_cfg.patch
        return batch * (latents // p[0]) * (h // p[1]) * (w // p[2])


# ==================================================================================================
# ODE initialisation
# ==================================================================================================


@register_stage("ode_init")
class OdeInit(_Student):
    """See the module docstring; config :class:`distill.config.OdeInitConfig`."""

    scfg: OdeInitConfig

    def build(self, ctx: StageContext) -> dict[str, Role]:
        self._require_init()
        roles = super().build(ctx)
        self.rcfg = self._check_student()
        self.level_rng = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.rank + 43)
        return roles

    def pairs_dir(self, ctx: StageContext) -> Path:
        return Path(self.scfg.pairs_dir) if self.scfg.pairs_dir else Path(ctx.out_dir) / "ode_pairs"

    def teacher_sampler(self, device: torch.device) -> tuple[Rollout, dict[str, Any]]:
        """The AR teacher's ODE sampler (its bundle's Euler schedule, the student's memory) and its lineage."""
        path = self.scfg.teacher or self.cfg.init
        bundle = load_bundle(path, device=device, load_autoencoder=False, load_text_encoder=False)
        rcfg, video = split_sampling(bundle.sampling, f"ode_init teacher {path}")
        if video.get("model_type", "ar") != "ar":
            raise ValueError(f"stage=ode_init: the teacher {path} is a {video.get('model_type')} model; ODE pairs come from "
                             "an AR (causal) multi-step model (Causal Forcing)")
        mem = self.rcfg.memory
        check_trained_span(mem, self.rcfg.chunk_size, "ar", video.get("trained_positions"), f"ode_init teacher {path}")
        rcfg = replace(rcfg, schedule="euler", renoise=False, mode="ar", chunk_size=self.rcfg.chunk_size, memory=mem,
                       steps=self.scfg.ode_steps or rcfg.steps, shift=self.scfg.ode_shift or rcfg.shift,
                       guidance=rcfg.guidance if self.scfg.ode_guidance is None else self.scfg.ode_guidance,
                       context_sigma=self.rcfg.context_sigma)
        return Rollout(bundle.model, rcfg), bundle_lineage(path, bundle.meta)

    def build_data(self, ctx: StageContext) -> ResumableLoader:
        directory = self.pairs_dir(ctx)
        rollout, lineage = self.teacher_sampler(ctx.device)
        spec = PairSpec(
            num_shards=self.scfg.num_shards, rollouts_per_shard=int(self.cfg.data.batch_size), chunks=self.scfg.rollout_chunks,
            chunk_size=self.scfg.chunk_size, max_history=self.scfg.max_history_latents, num_latents=int(self.cfg.data.num_latents),
            levels=[float(x) for x in self.scfg.levels], seed=ctx.seed, dtype=self.scfg.pair_dtype,
            rollout=asdict(rollout.cfg), teacher=lineage, data=str(self.cfg.data.path),
        )
        self.ode_teacher = lineage
        dataset = build_dataset(self.cfg.data, self.autoencoder.temporal_stride, ctx.seed)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" and ctx.compute_dtype == torch.bfloat16 \
            else contextlib.nullcontext()
        with autocast:
            generate_pairs(directory, spec, rollout, dataset, lambda b: encode_video(self.autoencoder, b, ctx.device), self.text,
                           collate_windows, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size)
        del rollout
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shards are written before anyone reads them
        self.pairs = PairShards(directory, self.scfg.num_shards)
        return ResumableLoader(self.pairs, 1, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size, shuffle=True,
                               collate_fn=first_item)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "level_rng": self.level_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "level_rng" in state:
            self.level_rng.set_state(state["level_rng"].cpu())

    def compute_losses(self, batch: dict[str, Any], step: int) -> StepOutput:
        """Regress chunks' final x0 from their trajectory state at a random level (one level per chunk)."""
        model = self.models["student"]
        lat = batch["latents"].float()  # [G, C, N, h, w]: real prefix + the teacher's chunks
        G, _, _, h, w = lat.shape
        Cs = self.scfg.chunk_size
        levels = batch["levels"].to(lat.device)
        S = levels.numel()
        history = int(batch["history"])
        clip = clip_inputs(batch, lat, Cs)
        tokens, mask = self.text(list(batch["caption"]))
        clip.text, clip.text_mask = tokens, mask
        total = lat.new_zeros(())
        count = lat.new_zeros(())
        n = len(batch["context_idx"])
        k = self.scfg.chunks_per_step or n
        chosen = sorted(torch.randperm(n, generator=self.level_rng)[:k].tolist()) if k < n else range(n)
        for i in chosen:
            start = history + i * Cs
            ctx_idx, ctx_pos, new_pos = batch["context_idx"][i], batch["context_pos"][i], batch["positions"][i]
            M = ctx_idx.shape[1]
            new = torch.arange(start, start + Cs, device=lat.device).expand(1, Cs)
            layouts = [Layout(torch.cat([ctx_idx[g : g + 1], new], 1), torch.cat([ctx_pos[g : g + 1], new_pos[g : g + 1]], 1), M)
                       for g in range(G)]
            choice = torch.randint(S, (G,), generator=self.level_rng)  # host-side: no device sync
            sig_new = levels[choice.to(lat.device)][:, None].expand(G, M + Cs)
            inp = layout_inputs(clip, layouts, sig_new, self.rcfg.context_sigma)
            x_in = inp.x0.clone()
            rows = torch.arange(G, device=lat.device)
            x_in[:, :, M:] = batch["states"][:, i][rows, choice.to(lat.device)].to(x_in.dtype)
            x_in = pin_image(x_in, inp.cond_mask, inp.image_latent)
            s5 = inp.sigma[:, None, :, None, None]
            # the noise that puts x_in on the flow path from x0 at sigma (context and image: clean, eps = x0)
            eps = torch.where(s5 > 0, (x_in - (1 - s5) * inp.x0) / s5.clamp_min(1e-6), inp.x0)
            out = model(x_in, inp.sigma, **model_kwargs(inp))
            err = prediction_loss(out, inp.x0, eps, inp.sigma, prediction_of(model), self.scfg.loss_space, self.scfg.sigma_floor)
            m = inp.loss_mask[:, None, :, None, None].expand_as(err)
            total = total + (err * m).sum()
            count = count + m.sum()
        loss = total / count.clamp_min(1.0)
        return StepOutput(losses={"student": loss}, metrics={"loss": loss.detach()}, tokens=self._tokens(G, k * Cs, h, w))

    def export(self, trainer, out_dir: Path) -> None:
        super().export(trainer, out_dir)
        if trainer.env.is_main and trainer.cfg.export:
            amend_bundle_meta(out_dir / "bundle", {"ode_teacher": getattr(self, "ode_teacher", None),
                                                   "ode_pairs": {"levels": list(self.scfg.levels), "shards": self.scfg.num_shards,
                                                                 "rollouts_per_shard": int(self.cfg.data.batch_size),
                                                                 "chunks": self.scfg.rollout_chunks}})


# ==================================================================================================
# Distillation (Context Forcing / Self-Forcing DMD)
# ==================================================================================================


@dataclass
class RolloutPlan:
    """Host-side choices of one self-rollout (the same on every rank, like Self-Forcing's broadcast exit step)."""

    history: int  # real latents before the window
    exit_step: int  # model call at which every chunk stops


@register_stage("distill")
class Distill(_Student):
    """See the module docstring; config :class:`distill.config.DistillConfig`."""

    scfg: DistillConfig

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._phase = "both"  # run_step sets generator / critic; a dry run computes both
        self._rollouts: dict[str, Rollout] = {}
        self.timer = PhaseTimer(torch.device("cpu"), enabled=False)

    # ------------------------------------------------------------------ roles
    def build(self, ctx: StageContext) -> dict[str, Role]:
        self._require_init()
        if not self.scfg.teacher:
            raise ValueError("stage=distill needs stage.teacher=<bundle>: the bidirectional memory teacher "
                             "(python -m train ... stage=midtrain stage.mode=bidirectional)")
        roles = super().build(ctx)
        self.rcfg = self._check_student()
        C, W = self.scfg.chunk_size, self.scfg.rollout_chunks * self.scfg.chunk_size
        teacher = load_bundle(self.scfg.teacher, load_autoencoder=False, load_text_encoder=False)
        where = f"stage.teacher={self.scfg.teacher}"
        t_rcfg, video = split_sampling(teacher.sampling, where)
        if video.get("model_type") != "bidirectional":
            raise ValueError(f"{where}: the teacher must be the bidirectional memory model (its bundle says model_type="
                             f"{video.get('model_type')!r}); train it with stage=midtrain stage.mode=bidirectional")
        if t_rcfg.chunk_size != C:
            raise ValueError(f"{where}: teacher chunk_size {t_rcfg.chunk_size} differs from the student's {C}")
        if t_rcfg.window_latents != W:
            raise ValueError(f"{where}: the teacher was trained on windows of {t_rcfg.window_latents} latents but the student "
                             f"rolls out stage.rollout_chunks={self.scfg.rollout_chunks} x {C} = {W}; make them equal")
        if self.scfg.teacher_context == "aligned" and asdict(t_rcfg.memory) != asdict(self.rcfg.memory):
            warnings.warn(f"{where}: the teacher was trained with memory {asdict(t_rcfg.memory)} but the student uses "
                          f"{asdict(self.rcfg.memory)}: the aligned context is the student's, so the teacher sees layouts "
                          "it was not trained on", stacklevel=2)
        if int(teacher.config["model"]["latent_channels"]) != self.model_cfg.latent_channels:
            raise ValueError(f"{where}: teacher latent_channels {teacher.config['model']['latent_channels']} != student's "
                             f"{self.model_cfg.latent_channels}")
        guidance = t_rcfg.guidance if self.scfg.real_guidance is None else float(self.scfg.real_guidance)
        self.teacher_rcfg = replace(t_rcfg, mode="window", window_latents=W, guidance=guidance)
        self.fake_rcfg = replace(self.teacher_rcfg, guidance=1.0)
        section = dict(teacher.config["model"])
        section["grad_checkpointing"] = bool(self.model_cfg.grad_checkpointing)
        fake = worlddit_factory(section)
        fake.load_state_dict(teacher.model.state_dict(), strict=True)
        fake.train()
        dtype = self.scfg.teacher_dtype
        if dtype == "auto":
            dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
        teacher.model.requires_grad_(False)
        self.teacher_lineage = bundle_lineage(self.scfg.teacher, teacher.meta)
        self.real_guidance = guidance
        if self.cfg.optim.name != "adamw" or float(self.cfg.optim.betas[0]) != 0.0:
            warnings.warn(f"stage=distill: Self-Forcing's DMD uses AdamW with beta1 = 0 for both networks (optim.betas=[0,0.999]); "
                          f"this run has optim.name={self.cfg.optim.name}, betas={list(self.cfg.optim.betas)}", stacklevel=2)
        optim = replace(self.cfg.optim, lr=self.cfg.optim.lr * self.scfg.fake_lr_scale, betas=list(self.cfg.optim.betas))
        roles["teacher"] = Role(teacher.model, trainable=False, frozen_dtype=None if dtype == "float32" else dtype)
        roles["fake_score"] = Role(fake, optim=optim)
        self.plan_rng = torch.Generator().manual_seed(ctx.seed * 1000 + 41)  # same on every rank
        self.timer = PhaseTimer(ctx.device, self.scfg.time_split)
        return roles

    def rollout(self, role: str) -> Rollout:
        """The sampler over a role: the student's (ar, distilled), or the teacher's / fake score's (window)."""
        if role not in self._rollouts:
            cfg = {"student": self.rcfg, "teacher": self.teacher_rcfg, "fake_score": self.fake_rcfg}[role]
            self._rollouts[role] = Rollout(SamplerView(self.models[role]), cfg)
        return self._rollouts[role]

    def _teacher_autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around the teacher when its weights are bf16 and no autocast is active."""
        p = next(self.models["teacher"].parameters())
        if p.dtype == torch.float32 or torch.is_autocast_enabled(p.device.type):
            return contextlib.nullcontext()
        return torch.autocast(p.device.type, dtype=p.dtype)

    # ------------------------------------------------------------------ cadence
    def generator_step(self, step: int) -> bool:
        return step % self.scfg.generator_every == 0

    def roles_to_update(self, step: int) -> list[str]:
        return ["fake_score", "student"] if self.generator_step(step) else ["fake_score"]

    def run_step(self, trainer, data_iter, step: int) -> StepOutput:
        """The generator phase (every ``generator_every``-th step), then the critic phase; each its own batches."""
        n = trainer.cfg.grad_accum
        outs = []
        phases = (["generator"] if self.generator_step(step) else []) + ["critic"]
        for phase in phases:
            role = "student" if phase == "generator" else "fake_score"
            tag = "gen" if phase == "generator" else "critic"
            self._phase = phase
            micro = []
            for i in range(n):
                with self.timer(f"{tag}_data"):
                    batch = next(data_iter)
                with self.timer.outer(tag):  # time/<tag>_backward: the micro-batch minus the phases timed inside it
                    micro.append(trainer.forward_backward(batch, step, [role], last=i == n - 1, scale=1.0 / n))
            with self.timer(f"{tag}_optim"):
                trainer.optimizer_step([role], step)
            outs.append(StepOutput.mean(micro))
        self._phase = "both"
        out = StepOutput({k: v for o in outs for k, v in o.losses.items()}, {k: v for o in outs for k, v in o.metrics.items()},
                         sum(o.tokens for o in outs))
        out.metrics.update(self.timer.pop())
        return out

    # ------------------------------------------------------------------ the two losses
    def plan(self, step: int, num_latents: int) -> RolloutPlan:
        """History length j (whole chunks, U{0..m}, m from the curriculum; 0 for teacher_context=none) and exit step."""
        C, W = self.scfg.chunk_size, self.scfg.rollout_chunks * self.scfg.chunk_size
        if num_latents < W:
            raise ValueError(f"data.num_latents={num_latents} cannot hold the rollout window of {W} latents")
        history = 0
        if self.scfg.teacher_context != "none":
            m = curriculum_length(self.scfg.history_curriculum, step, num_latents - W)
            history = C * int(torch.randint(m // C + 1, (), generator=self.plan_rng))
        exits = self.scfg.exit_steps
        return RolloutPlan(history, int(exits[int(torch.randint(len(exits), (), generator=self.plan_rng))]))

    def student_rollout(self, batch: dict[str, Any], x0: Tensor, plan: RolloutPlan, grad: bool,
                        generator: Optional[torch.Generator] = None) -> SelfRollout:
        """The student's self-rollout for a batch (x0 [B, C, T, h, w]); noise from the stage's generator."""
        tokens, mask = self.text(list(batch["caption"]))
        dev = x0.device
        return self_rollout(self.rollout("student"), x0, batch["actions"].to(dev), batch["w2c"].to(dev).float(), batch["K"].to(dev).float(),
                            history=plan.history, chunks=self.scfg.rollout_chunks, exit_step=plan.exit_step,
                            generator=generator if generator is not None else self.generator, grad=grad, text=tokens, text_mask=mask)

    def _window_cond(self, batch: dict[str, Any], sr: SelfRollout, rows: Tensor, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        sl = slice(sr.history, sr.history + sr.length)
        r = rows.to(dev)
        return batch["actions"].to(dev)[r, sl], batch["w2c"].to(dev).float()[r, sl], batch["K"].to(dev).float()[r, sl]

    def score_contexts(self, batch: dict[str, Any], sr: SelfRollout) -> list[tuple[Tensor, Any, Any]]:
        """Per group of samples with equal context size: (rows, prefix state, window-mode ChunkContext) built from the
        teacher-context layouts; shared by the teacher and the fake score (window mode caches nothing model-specific)."""
        dev = sr.window.device
        tr = self.rollout("teacher")
        out = []
        for rows, lay in group_layouts(teacher_layouts(sr, self.scfg.teacher_context)):
            state = prefix_state(tr, sr, rows)
            a, w2c, K = self._window_cond(batch, sr, rows, dev)
            out.append((rows.to(dev), state, tr.context(state, a, w2c, K, layout=lay)))
        return out

    def _noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One DMD noise level per sample [B] and noise like x (from the stage's checkpointed generator)."""
        g = self.generator
        sigma = dmd_sigma(x.shape[0], g, self.scfg.dmd_shift, self.scfg.dmd_sigma_min, self.scfg.dmd_sigma_max, device=x.device)
        eps = torch.randn(x.shape, generator=g, device=g.device).to(device=x.device, dtype=x.dtype)
        return sigma, eps

    def generator_losses(self, batch: dict[str, Any], x0: Tensor, step: int) -> StepOutput:
        T = self.timer
        plan = self.plan(step, x0.shape[2])
        with T("gen_rollout"):
            sr = self.student_rollout(batch, x0, plan, grad=True)
        x = sr.window
        B, W = x.shape[0], sr.length
        sigma, eps = self._noise(x)
        x_t = add_noise(x.detach(), eps, sigma)
        real = torch.zeros_like(x, dtype=torch.float32)
        fake = torch.zeros_like(real)
        with T("gen_scores"), torch.no_grad():
            groups = self.score_contexts(batch, sr)
            for rows, state, ctx in groups:
                s = sigma[rows][:, None].expand(-1, W)
                with self._teacher_autocast():
                    real.index_copy_(0, rows, self.rollout("teacher").predict(state, ctx, x_t[rows], s)[1].float())
                fake.index_copy_(0, rows, self.rollout("fake_score").predict(state, ctx, x_t[rows], s)[1].float())
        with T("gen_loss"):
            loss, stats = dmd_loss(x, real, fake, ~sr.pinned)
        h, w = x.shape[-2:]
        metrics = {f"gen/{k}": v for k, v in stats.items()}
        metrics.update({"gen/dmd_loss": loss.detach(), "gen/sigma": sigma.mean(), "gen/exit_step": float(plan.exit_step),
                        "gen/history": float(plan.history), "gen/teacher_context": float(sum(c.layout.num_context * len(r) for r, _, c in groups) / B)})
        return StepOutput(losses={"student": loss}, metrics=metrics, tokens=self._tokens(B, W, h, w))

    def critic_losses(self, batch: dict[str, Any], x0: Tensor, step: int) -> StepOutput:
        T = self.timer
        plan = self.plan(step, x0.shape[2])
        with T("critic_rollout"), torch.no_grad():
            sr = self.student_rollout(batch, x0, plan, grad=False)
            groups = self.score_contexts(batch, sr)
        x = sr.window.detach()
        B, W = x.shape[0], sr.length
        sigma, eps = self._noise(x)
        x_t = add_noise(x, eps, sigma)
        fr = self.rollout("fake_score")
        with T("critic_forward"):
            total, count = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
            for rows, state, ctx in groups:
                s = fr.chunk_sigma(ctx, sigma[rows][:, None].expand(-1, W), len(rows), W)
                x_in = pin_image(x_t[rows], ctx.pinned, state.image_latent) if ctx.pinned is not None else x_t[rows]
                out = fr.output(state, ctx, x_in, s)
                err = prediction_loss(out, x[rows], eps[rows], s, fr.prediction, self.scfg.loss_space, self.scfg.sigma_floor)
                m = (~sr.pinned[rows])[:, None, :, None, None].expand_as(err).float()
                total = total + (err * m).sum()
                count = count + m.sum()
            loss = total / count.clamp_min(1.0)
        h, w = x.shape[-2:]
        metrics = {"loss": loss.detach(), "critic/sigma": sigma.mean(), "critic/history": float(plan.history)}
        return StepOutput(losses={"fake_score": loss}, metrics=metrics, tokens=self._tokens(B, W, h, w))

    def compute_losses(self, batch: dict[str, Any], step: int) -> StepOutput:
        with self.timer(f"{'critic' if self._phase == 'critic' else 'gen'}_encode"):
            x0 = encode_video(self.autoencoder, batch, self.device)
        if self._phase == "generator":
            return self.generator_losses(batch, x0, step)
        if self._phase == "critic":
            return self.critic_losses(batch, x0, step)
        gen, critic = self.generator_losses(batch, x0, step), self.critic_losses(batch, x0, step)
        return StepOutput({**gen.losses, **critic.losses}, {**gen.metrics, **critic.metrics}, gen.tokens + critic.tokens)

    # ------------------------------------------------------------------ state, export
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "plan_rng": self.plan_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "plan_rng" in state:
            self.plan_rng.set_state(state["plan_rng"].cpu())

    def export(self, trainer, out_dir: Path) -> None:
        super().export(trainer, out_dir)
        if trainer.env.is_main:
            amend_bundle_meta(out_dir / "bundle", {
                "teacher": self.teacher_lineage,
                "distill": {"teacher_context": self.scfg.teacher_context, "rollout_chunks": self.scfg.rollout_chunks,
                            "generator_every": self.scfg.generator_every, "real_guidance": self.real_guidance,
                            "generator_steps": trainer.step // self.scfg.generator_every,
                            "history_curriculum": [list(e) for e in self.scfg.history_curriculum]},
            })
