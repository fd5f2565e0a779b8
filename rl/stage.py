"""Stage ``rl``: WorldCompass RL post-training with the DiffusionNFT update (research/rl_distill.md §1, §2.4, §6).

One step (``run_step``), on each rank:

1. **target chunk** n from the curriculum (min2max / max2min / random over min_chunk..window_latents/chunk);
2. **paths**: ``groups_per_step`` start images and camera paths (``rl.paths``), planned ahead in a thread;
3. **rollouts** with the EMA policy shadow (``rl.shadow``) through ``models.rollout.Rollout`` (``rl.rollouts``):
   the prefix once per group, then G candidates of chunk n batched from the shared history;
4. **rewards** on the decoded candidates (``rl.rewards``), then the trainer's **advantages** (``rl.advantages``):
   per-reward group standardisation, weights, Best-of-N, clipping, r ∈ [0, 1];
5. **the NFT update** (``rl.nft``) on the kept candidates: for a random ``train_timestep_fraction`` of the
   sampler's σ levels, x_σ of the target chunk only, its context filled once per micro-batch and detached,
   the current policy's prediction against the sampling policy's (the shadow), through the model's
   prediction parameterisation; ``trainer.grad_accum`` micro-batches of ``train_batch`` candidates per
   optimizer step (WorldCompass: 6 kept, 1 per micro-batch, 2 per step: 3 updates per RL step);
6. the shadow folds in the new weights (decay min(0.9, 0.2 + 0.01 k)); the trainer keeps the checkpoint EMA.

Logged per step: every reward score, zero-std group shares, NaN shares, the advantage histogram, the NFT
loss parts, and the time split (plan, prefix, candidates, decode, reward, update). All randomness is
seeded by (seed, rank, step), so a resumed run repeats the uninterrupted one exactly. The export is a
bundle (checkpoint-EMA weights, LoRA merged, the parent's sampling section) with lineage in meta.json.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from data.synthetic import derive_seed
from models.bundle import load_bundle, save_bundle, worlddit_factory
from models.flow import add_noise
from models.layout import Layout
from models.rollout import Rollout
from rl.advantages import compute_advantages
from rl.config import RLStageConfig
from rl.evaluate import RewardEvaluator, encode_captions, rl_settings
from rl.nft import kl_penalty, nft_loss
from rl.paths import PathSource, RLPath, target_chunk
from rl.rewards import build_rewards, score_batch
from rl.rollouts import GroupRollout, PhaseTimer, reward_batch, roll_out_group, source_alt_truth
from rl.shadow import PolicyShadow
from train.config import EMAConfig
from train.lora import apply_lora, has_lora, merge_lora_state, save_adapter
from train.stage import Role, Stage, StageContext, StepOutput, register_stage

__all__ = ["RLStage", "RUNTIME_MODEL_KEYS"]

# Switches of ``model`` that do not change the weights: taken from the run config, the rest from the bundle.
RUNTIME_MODEL_KEYS = ("attn_backend", "grad_checkpointing", "fuse")


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


@register_stage("rl")
class RLStage(Stage):
    """See the module docstring; ``self.cfg`` is the whole run config, ``self.scfg`` its ``stage`` node."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        s = cfg.stage
        self.scfg: RLStageConfig = s if isinstance(s, RLStageConfig) else RLStageConfig(**_plain(s))
        self._futures: dict[int, Future] = {}
        self._rollouts: dict[str, Rollout] = {}

    # ------------------------------------------------------------------ roles
    def build(self, ctx: StageContext) -> dict[str, Role]:
        cfg, s = self.cfg, self.scfg
        if not cfg.init:
            raise ValueError("stage=rl trains a policy from a bundle: pass init=<bundle directory> (an AR, mid-trained bundle)")
        backend = cfg.dist.backend
        if backend not in ("none", "ddp"):
            raise ValueError(f"stage=rl supports dist=none or ddp (the rollout shadow is a full copy per rank), got dist={backend}")
        self.ctx = ctx
        bundle = load_bundle(cfg.init, device="cpu")
        self.bundle_config = bundle.config
        section = dict(bundle.config["model"])
        section.update({k: getattr(cfg.model, k) for k in RUNTIME_MODEL_KEYS if hasattr(cfg.model, k)})
        model = worlddit_factory(section)
        model.load_state_dict(bundle.model.state_dict(), strict=True)
        self.model_section = section
        base_state = {k: v.clone() for k, v in model.state_dict().items()} if s.kl_weight > 0 else None
        self.parent = {"path": str(Path(cfg.init).resolve()), **{k: bundle.meta.get(k) for k in ("stage", "step", "config_hash", "code_version", "created")}}
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
        self.settings = rl_settings(bundle.sampling, s, f"bundle {cfg.init}")
        C = self.settings.rollout.chunk_size
        self.max_chunk = s.window_latents // C
        if self.max_chunk < s.min_chunk:
            raise ValueError(f"stage.window_latents={s.window_latents} holds {self.max_chunk} chunks of {C} latents, fewer than stage.min_chunk={s.min_chunk}")
        self.autoencoder = bundle.autoencoder.to(ctx.device).eval()
        self.text_encoder = bundle.text_encoder.to(ctx.device).eval() if bundle.text_encoder is not None else None
        self.shadow = PolicyShadow(model, s.shadow_decay, ctx.device)
        self.executor = ThreadPoolExecutor(max(1, s.rewards.workers), thread_name_prefix="rl")
        self.rewards = build_rewards(s.rewards, s.score_names, ctx.device, self.executor)
        self.data_dir = s.paths.data or cfg.data.path
        stride = int(self.autoencoder.temporal_stride)
        self.source = PathSource(s.paths, self.data_dir, self.settings, stride, ctx.seed, ctx.rank)
        self.evaluator = RewardEvaluator(s, self.data_dir, self.settings, self.autoencoder, self.rewards, ctx.device)
        self.revisit = any(r.name == "revisit" for r in self.rewards)
        roles = {"policy": Role(model, ema=EMAConfig(decay=s.ckpt_ema_decay))}
        if base_state is not None:
            ref = worlddit_factory(section)
            ref.load_state_dict(base_state, strict=True)
            roles["reference"] = Role(ref.eval().requires_grad_(False), trainable=False, wrap=False)
        return roles

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "shadow" in state:
            self.shadow.load_state_dict(state["shadow"])

    # ------------------------------------------------------------------ helpers
    def _raw_policy(self, trainer) -> torch.nn.Module:
        return trainer.roles["policy"].wrapped.raw

    def _rollout(self, trainer, which: str) -> Rollout:
        """The sampler over one model: ``shadow`` (rollouts, v_old), ``fill`` (the raw policy: context K/V),
        ``policy`` (the wrapped policy: predictions with gradients), ``reference`` (KL)."""
        if which not in self._rollouts:
            model = {"shadow": lambda: self.shadow.module, "fill": lambda: self._raw_policy(trainer),
                     "policy": lambda: self.models["policy"], "reference": lambda: self.models["reference"]}[which]()
            self._rollouts[which] = Rollout(model, self.settings.rollout)
        return self._rollouts[which]

    def _plan(self, step: int, n_chunk: int) -> list[RLPath]:
        T = n_chunk * self.settings.rollout.chunk_size
        return [self.source.plan(step, g, T) for g in range(self.scfg.groups_per_step)]

    def _target(self, step: int) -> int:
        return target_chunk(self.scfg.curriculum, step, self.scfg.min_chunk, self.max_chunk, self.source.rng(step, 0, 101))

    def _paths(self, step: int) -> tuple[int, list[RLPath]]:
        n = self._target(step)
        fut = self._futures.pop(step, None)
        return n, (fut.result() if fut is not None else self._plan(step, n))

    def _prefetch(self, step: int, last: int) -> None:
        if step <= last and step not in self._futures:
            self._futures[step] = self.executor.submit(self._plan, step, self._target(step))

    def _reduce(self, trainer):
        if not (trainer.env.distributed and trainer.env.world_size > 1):
            return None
        import torch.distributed as dist

        def reduce(t: Tensor) -> Tensor:
            x = t.to(trainer.device)
            dist.all_reduce(x)
            return x.to(t.device)

        return reduce

    def _generator(self, step: int, salt: int, device: Optional[torch.device] = None) -> torch.Generator:
        dev = device if device is not None else self.device
        return torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, self.ctx.rank, step, salt))

    # ------------------------------------------------------------------ the step
    def run_step(self, trainer, data_iter, step: int) -> StepOutput:
        s = self.scfg
        timer = PhaseTimer(self.device, s.time_split)
        n_chunk, paths = self._paths(step)
        timer.mark("plan")
        shadow = self._rollout(trainer, "shadow")
        text = encode_captions(self.text_encoder, self.shadow.module, [p.clip.caption for p in paths], self.device)
        with trainer.autocast():
            gr = roll_out_group(shadow, self.autoencoder, paths, n_chunk, s.num_candidates, self._generator(step, 1),
                                self.device, text, timer)
        C = self.settings.rollout.chunk_size
        batch = reward_batch(self.autoencoder, paths, gr.prefix.latents, gr.record.latents, s.num_candidates, gr.record.pinned,
                             self.settings.steps, decode_pad=s.decode_pad, revisit=self.revisit,
                             alt_truth=source_alt_truth(self.source, gr.start, C, step), timer=timer)
        res = score_batch(self.rewards, batch)
        adv = compute_advantages(res.scores, batch.group, s.trained_weights, std_type=s.std_type, bestofn=s.bestofn,
                                 adv_clip=s.adv_clip, generator=self._generator(step, 3, torch.device("cpu")),
                                 reduce=self._reduce(trainer))
        timer.mark("reward")
        self._prefetch(step + 1, trainer.cfg.steps)
        loss, parts, tokens = self._update(trainer, step, gr, adv.kept, adv.r)
        timer.mark("update")
        decay = self.shadow.update(self._raw_policy(trainer), step)
        metrics: dict[str, Any] = {"loss": loss, **parts}
        metrics.update({k: v for k, v in adv.metrics.items() if np.isfinite(v)})
        metrics.update({k: v for k, v in res.diagnostics.items() if np.isfinite(v)})
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        metrics["time/step"] = sum(timer.seconds.values())
        metrics["rl/target_chunk"] = float(n_chunk)
        metrics["rl/shadow_decay"] = decay
        return StepOutput(losses={"policy": loss}, metrics=metrics, tokens=tokens)

    def _update(self, trainer, step: int, gr: GroupRollout, kept: Tensor, r: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
        """NFT updates on the kept candidates: micro-batches of ``train_batch``, ``trainer.grad_accum`` per optimizer step."""
        s = self.scfg
        fill, shadow = self._rollout(trainer, "fill"), self._rollout(trainer, "shadow")
        ref = self._rollout(trainer, "reference") if s.kl_weight > 0 else None
        self._rollout(trainer, "policy")
        n_steps = fill.num_steps
        n_sig = max(1, int(round(s.train_timestep_fraction * n_steps)))
        levels = fill.sigmas(self.device)[:n_steps]  # the sampler's non-terminal sigma levels
        g_cpu = self._generator(step, 4, torch.device("cpu"))
        g_noise = self._generator(step, 5)
        micro = [kept[i:i + s.train_batch] for i in range(0, kept.numel(), s.train_batch)]
        accum = trainer.cfg.grad_accum
        losses, parts_sum, tokens = [], {}, 0
        x0_all = gr.record.latents.detach()
        L, hw = x0_all.shape[2], x0_all.shape[3] * x0_all.shape[4]
        p = self.model_section.get("patch", [1, 1, 1])
        rec = gr.record  # the candidates' layout: the memory the sampler selected, reused (not re-selected) per micro-batch
        new_idx = torch.arange(gr.start, gr.start + L, device=rec.context_idx.device).expand(rec.context_idx.shape[0], L)
        slots = Layout(torch.cat([rec.context_idx, new_idx], 1), torch.cat([rec.context_pos, rec.positions], 1), rec.context_idx.shape[1])
        for o in range(0, len(micro), accum):
            group = micro[o:o + accum]
            calls = len(group) * n_sig
            done = 0
            for rows in group:
                rows_d = rows.to(gr.actions.device)
                cond = (gr.actions[rows_d], gr.w2c[rows_d], gr.K[rows_d])
                lay = Layout(slots.indices[rows.to(slots.indices.device)], slots.positions[rows.to(slots.indices.device)], slots.num_context)
                st_theta = gr.candidates.take(rows_d)
                with torch.no_grad(), trainer.autocast():
                    ctx_theta = fill.context(st_theta, *cond, layout=lay)  # the current policy's context K/V, detached
                    st_old = ctx_old = st_ref = ctx_ref = None
                    if not s.official_overwrite:
                        st_old = gr.candidates.take(rows_d)
                        ctx_old = shadow.context(st_old, *cond, layout=lay)
                    if ref is not None:
                        st_ref = gr.candidates.take(rows_d)
                        ctx_ref = ref.context(st_ref, *cond, layout=lay)
                order = torch.randperm(n_steps, generator=g_cpu)[:n_sig]
                x0 = x0_all[rows_d].float()
                for k in order.tolist():
                    eps = torch.randn(x0.shape, generator=g_noise, device=g_noise.device).to(x0.device)
                    item = {"x0": x0, "eps": eps, "sigma": levels[k], "r": r[rows].to(self.device).float(),
                            "theta": (st_theta, ctx_theta), "old": (st_old, ctx_old), "ref": (st_ref, ctx_ref)}
                    done += 1
                    out = trainer.forward_backward(item, step, ["policy"], last=done == calls, scale=1.0 / calls)
                    losses.append(out.losses["policy"].detach())
                    for key, v in out.metrics.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + v
                    tokens += int(rows.numel()) * L * hw // max(1, p[1] * p[2])
            trainer.optimizer_step(["policy"], step)
        n = max(1, len(losses))
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
        return loss, {k: v / n for k, v in parts_sum.items()}, tokens

    def compute_losses(self, batch: dict[str, Any], step: int) -> StepOutput:
        """One NFT term: candidates x0 [b, C, L, h, w] at one sigma level, their contexts, optimality r [b]."""
        s = self.scfg
        x0, sigma, r = batch["x0"], batch["sigma"], batch["r"]
        st_theta, ctx_theta = batch["theta"]
        x = add_noise(x0, batch["eps"], sigma)
        x0_old = None
        if not s.official_overwrite:
            st_old, ctx_old = batch["old"]
            with torch.no_grad():
                x0_old = self._rollouts["shadow"].predict(st_old, ctx_old, x, sigma)[1]
        v_theta, x0_theta = self._rollouts["policy"].predict(st_theta, ctx_theta, x, sigma)
        mask = None if ctx_theta.pinned is None else (~ctx_theta.pinned)[:, None, :, None, None]
        loss, parts = nft_loss(x0_theta, x0_old, x0, r, beta=s.beta, mask=mask, adaptive=s.adaptive_weight,
                               official_overwrite=s.official_overwrite)
        metrics = {f"nft/{k}": v for k, v in parts.items()}
        if s.kl_weight > 0:
            st_ref, ctx_ref = batch["ref"]
            with torch.no_grad():
                v_ref = self._rollouts["reference"].predict(st_ref, ctx_ref, x, sigma)[0]
            kl = kl_penalty(v_theta, v_ref, mask)
            loss = loss + s.kl_weight * kl
            metrics["nft/kl"] = kl.detach()
        return StepOutput(losses={"policy": loss}, metrics=metrics)

    # ------------------------------------------------------------------ evaluation and export
    def _policy_for_eval(self, trainer) -> torch.nn.Module:
        """A plain copy of the policy with the checkpoint-EMA weights (LoRA merged), on this rank's device."""
        state = trainer.full_state_dict("policy", ema=trainer.has_ema("policy"))
        model = worlddit_factory(self.model_section)
        model.load_state_dict(merge_lora_state(state, self.cfg.lora) if has_lora(state) else state, strict=True)
        return model.to(self.device).eval()

    def sample(self, trainer, step: int, out_dir: Path) -> dict[str, float]:
        """Every reward of the checkpoint-EMA policy on the fixed evaluation paths (logged as sample/<score>)."""
        model = self._policy_for_eval(trainer)
        if not trainer.env.is_main:
            return {}
        with trainer.autocast():
            scores = self.evaluator.evaluate(model, self.text_encoder)
        return {k: v for k, v in scores.items() if np.isfinite(v)}

    def export(self, trainer, out_dir: Path) -> None:
        """bundle/ (checkpoint-EMA weights, LoRA merged; the parent's sampling section) and, with LoRA, adapter/ from the
        same weights (as the flow stages export: base + adapter = model.safetensors, base + adapter_raw = model_raw)."""
        from train.stages.flow_stage import last_logged_metrics

        ema = trainer.has_ema("policy")
        run_state = trainer.full_state_dict("policy", ema=ema)
        raw_state = trainer.full_state_dict("policy", ema=False) if ema else None
        if not trainer.env.is_main:
            return
        s = self.scfg
        lora = has_lora(run_state)
        meta = {
            "stage": self.name,
            "step": trainer.step,
            "parent": self.parent,
            "data": {"path": str(Path(self.data_dir).resolve()), "paths": dataclasses.asdict(s.paths)},
            "metrics": last_logged_metrics(trainer.out_dir),
            "run_dir": str(trainer.out_dir.resolve()),
            "lora": _plain(self.cfg.lora) if lora else None,
            "rl": {"weights": s.trained_weights, "official_overwrite": s.official_overwrite, "beta": s.beta,
                   "num_candidates": s.num_candidates, "rollout_steps": self.settings.rollout.steps,
                   "shift": self.settings.rollout.shift, "curriculum": s.curriculum, "window_latents": s.window_latents},
        }
        if lora:
            save_adapter(run_state, self.cfg.lora, out_dir / "adapter", base=self.parent, raw_state=raw_state)
            run_state = merge_lora_state(run_state, self.cfg.lora)
            raw_state = merge_lora_state(raw_state, self.cfg.lora) if raw_state is not None else None
        config = self.bundle_config
        save_bundle(
            out_dir / "bundle",
            raw_state if raw_state is not None else run_state,
            model_cfg=config["model"],
            autoencoder_cfg=config["autoencoder"],
            text_encoder_cfg=config["text_encoder"],
            sampling=config["sampling"],
            meta=meta,
            ema_state=run_state if raw_state is not None else None,
            overwrite=True,
        )
