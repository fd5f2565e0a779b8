"""Training-step benchmark of WorldDiT: forward + backward + optimizer step at a 480p-like layout.

Default shape (issue 9): batch 1, 24 latents of 30x52 tokens (37,440 video tokens), 256 text tokens,
PRoPE on, block-causal over chunks of 4 latents (the mid-training memory layout: 20 context latents +
a 4-latent target, contiguous reframed positions), bf16 autocast on CUDA.

    python -m benchmarks.train_step --preset small base                      # full training, fp32 master weights
    python -m benchmarks.train_step --preset hy15 --lora --grad-ckpt         # LoRA, frozen base in bf16
    python -m benchmarks.train_step --preset base --backend flex sdpa        # one row per attention backend
    python -m benchmarks.train_step --preset base --no-optim                 # forward + backward only
    python -m benchmarks.train_step --preset tiny --device cpu --latents 8 --height 4 --width 6 --text 8 --steps 2

One step is the trainer's step: ``flow_matching_loss`` (train/stages/inputs.py) under autocast,
``backward``, then ``Backend.optimizer_step`` (global grad norm, clipping, fused AdamW or Muon with a
device-side skip flag, ``zero_grad``), from a ``Backend`` of ``dist.backend=none`` that also applies
the trainer's activation checkpointing (``--grad-ckpt``). With ``--lora`` the base weights are cast to
``--param-dtype`` (default bf16) and frozen, the adapters (train/lora.py defaults) train in fp32.

Timing: CUDA events around every step and at the forward / backward / optimizer boundaries, no host
synchronisation inside the timed loop; medians of ``--steps`` steps after ``--warmup`` (the first
warm-up step also compiles flex_attention). Reported per row: median step time and its phases,
tokens/s (video tokens of the batch per second), model TFLOP per step from benchmarks/flops.py
(matmuls + both attention passes + the PRoPE transforms; backward counted per computed gradient,
checkpoint recompute and the optimizer's own FLOPs, e.g. Muon's Newton-Schulz, excluded), achieved TFLOP/s, MFU against the H100's dense bf16 peak (989
TFLOP/s) and against the ~800 TFLOP/s its bf16 matmuls reach here, and peak allocated memory
(weights, optimizer state and activations). A row that runs out of memory is recorded as such and,
with ``--ckpt-on-oom``, retried with activation checkpointing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from benchmarks.kernel_profile import format_profile, profile_kernels
from benchmarks.flops import H100_MEASURED_BF16, H100_PEAK_BF16, mfu, worlddit_flops
from benchmarks.timing import (EventTimer, Report, environment, peak_memory_gib, reset_peak_memory, time_calls,
                               with_oom_retry)
from data.geometry import invert_rigid, make_intrinsics, make_pose, normalize_intrinsics, rotation_y
from infer.timing import summarize
from models.attention import BACKENDS, MaskSpec, resolve_backend
from models.config import PRESETS, WorldDiTConfig, preset
from models.dit import WorldDiT
from train.config import DistConfig, OptimConfig
from train.distributed import Backend, DistEnv, apply_activation_checkpointing
from train.lora import LoraConfig, apply_lora
from train.stages.inputs import ModelInputs, flow_matching_loss

__all__ = ["camera_walk", "make_inputs", "build_worlddit", "model_kwargs_of", "bench_train", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["base"], choices=sorted(PRESETS))
    p.add_argument("--backend", nargs="+", default=["auto"], choices=list(BACKENDS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latents", type=int, default=24)
    p.add_argument("--height", type=int, default=30, help="latent height (tokens with patch 1)")
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--text", type=int, default=256, help="text tokens (0 = none)")
    p.add_argument("--chunk", type=int, default=4, help="latents per block-causal chunk (0 = bidirectional)")
    p.add_argument("--no-camera", action="store_true", help="build the model without its PRoPE branch")
    p.add_argument("--grad-ckpt", action="store_true", help="the trainer's activation checkpointing (every block)")
    p.add_argument("--ckpt-on-oom", action="store_true", help="retry a row that runs out of memory with --grad-ckpt")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (train/lora.py defaults) on a frozen base")
    p.add_argument("--lora-rank", type=int, default=LoraConfig.rank)
    p.add_argument("--param-dtype", default=None, choices=list(DTYPES),
                   help="weights of the trained model (default fp32) or of the frozen LoRA base (default bf16)")
    p.add_argument("--optim", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--no-optim", action="store_true", help="forward + backward only (no optimizer step)")
    p.add_argument("--profile", action="store_true", help="after timing, profile one step: device time per kernel category")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md (rewritten after every row)")
    return p.parse_args(argv)


# ---- inputs and model (shared with benchmarks/peer_diffusers.py and benchmarks/rollout.py) ------------------
def camera_walk(batch: int, frames: int, generator: torch.Generator) -> Tensor:
    """c2w [batch, frames, 4, 4] (float32) of a random walk: yaw drifts a few degrees per latent, the camera moves forward."""
    yaw = torch.cumsum(torch.randn(batch, frames, generator=generator, dtype=torch.float64) * 4.0, dim=1)
    R = rotation_y(yaw)  # [B, T, 3, 3]
    step = R[..., :, 2] * 0.25  # forward (camera +z) in world coordinates
    return make_pose(R, torch.cumsum(step, dim=1)).float()


def normalized_K(batch: int, frames: int, height: int, width: int) -> Tensor:
    """Normalised intrinsics [batch, frames, 3, 3] of a 60-degree horizontal field of view."""
    return normalize_intrinsics(make_intrinsics(60.0, width, height), width, height).expand(batch, frames, 3, 3).clone()


def make_inputs(cfg: WorldDiTConfig, *, batch: int, latents: int, height: int, width: int, text: int,
                chunk: int | None, device: torch.device, seed: int = 0) -> tuple[ModelInputs, Tensor]:
    """One random training batch on ``device`` (never all zeros) and its noise: (ModelInputs, eps [B, C, T, H, W])."""
    if text and cfg.text_dim == 0:
        raise ValueError(f"make_inputs: the model has no text stream (text_dim=0) but text={text} tokens were asked for")
    g = torch.Generator().manual_seed(seed)
    B, C, T = batch, cfg.latent_channels, latents
    x0 = torch.randn(B, C, T, height, width, generator=g)
    cond = torch.zeros(B, T, dtype=torch.bool)
    cond[:, 0] = True
    inp = ModelInputs(
        x0=x0,
        sigma=torch.rand(B, T, generator=g),
        actions=torch.randint(0, cfg.num_actions, (B, T), generator=g),
        w2c=invert_rigid(camera_walk(B, T, g)),
        K=normalized_K(B, T, height, width),
        t_pos=torch.arange(T).expand(B, T).clone(),
        image_latent=x0[:, :, 0].clone(),
        cond_mask=cond,
        loss_mask=torch.ones(B, T),
        text=torch.randn(B, text, cfg.text_dim, generator=g) if text else None,
        text_mask=None,  # no padding: keeps the dense attention kernels eligible
        chunk_size=chunk,
    )
    return inp.to(device), torch.randn(x0.shape, generator=g).to(device)


def model_kwargs_of(inp: ModelInputs) -> dict[str, Any]:
    """WorldDiT keyword arguments of a batch (besides x and sigma)."""
    return dict(actions=inp.actions, w2c=inp.w2c, K=inp.K, t_pos=inp.t_pos, text=inp.text, text_mask=inp.text_mask,
                image_latent=inp.image_latent, cond_mask=inp.cond_mask, chunk_size=inp.chunk_size)


def build_worlddit(cfg: WorldDiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WorldDiT:
    """A randomly initialised WorldDiT built directly on ``device`` in ``dtype`` (no fp32 copy of an 8B model)."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return WorldDiT(cfg)
    finally:
        torch.set_default_dtype(previous)


# ---- the benchmark --------------------------------------------------------------------------------------------
def _config(a: argparse.Namespace, name: str, backend: str) -> WorldDiTConfig:
    base = preset(name)
    return replace(base, attn_backend=backend, camera=base.camera and not a.no_camera)


def bench_train(a: argparse.Namespace, name: str, backend: str, grad_ckpt: bool, report: Report | None = None) -> dict[str, Any]:
    """One row: the median training step of preset ``name`` with attention ``backend``.

    After the warm-up, ``report`` gets a note with the peak memory so far (kept if the timed steps are cut short).
    """
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    cfg = _config(a, name, backend)
    chunk = a.chunk or None
    dtype = DTYPES[a.param_dtype or ("bf16" if a.lora else "fp32")]
    reset_peak_memory(device)
    model = build_worlddit(cfg, device, dtype)
    lora = LoraConfig(enabled=True, rank=a.lora_rank) if a.lora else None
    if lora is not None:
        model = apply_lora(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 over the frozen low-precision base
    model.train()
    optim_cfg = OptimConfig(name=a.optim)
    trainer_backend = Backend(DistConfig(backend="none", activation_checkpointing=grad_ckpt), DistEnv(device=device), bf16=cuda)
    if a.no_optim:
        wrapped = None
        if grad_ckpt:
            apply_activation_checkpointing(model)
    else:  # the trainer's preparation: checkpoint wrappers, then the optimizer over the trainable parameters
        wrapped = trainer_backend.prepare("student", model, True, optim_cfg, True, None)
    inp, eps = make_inputs(cfg, batch=a.batch, latents=a.latents, height=a.height, width=a.width, text=a.text,
                           chunk=chunk, device=device)

    def step(timer: EventTimer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = flow_matching_loss(model, inp, eps)
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        if wrapped is not None:
            trainer_backend.optimizer_step(wrapped, optim_cfg)
            timer.mark("optimizer")
        else:
            model.zero_grad(set_to_none=True)

    def warm() -> None:
        if report is not None and a.warmup:
            report.note(f"{name} ({backend}, ckpt {'yes' if grad_ckpt else 'no'}): {a.warmup} warm-up step(s) done, "
                        f"peak memory so far {peak_memory_gib(device):.1f} GiB")

    times, phases = time_calls(step, warmup=a.warmup, reps=a.steps, device=device, after_warmup=warm)
    peak = peak_memory_gib(device)
    if a.profile and report is not None:
        prof = profile_kernels(lambda: EventTimer(device).once(step), device)
        report.section(format_profile(f"one {name} training step ({backend})", prof))
    flops = worlddit_flops(cfg, batch=a.batch, frames=a.latents, height=a.height, width=a.width, text=a.text,
                           chunk=chunk, mode="train", lora_rank=a.lora_rank if a.lora else None,
                           lora_targets=lora.target_modules if lora else (), grad_ckpt=grad_ckpt)
    t = summarize(times)
    med = t["median"]
    tokens = a.batch * a.latents * (a.height // cfg.patch[1]) * (a.width // cfg.patch[2])
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shown = resolve_backend(backend, device, MaskSpec.full(1, 1), needs_grad=True)
    row = {
        "preset": name, "lora": f"r{a.lora_rank}" if a.lora else "no", "backend": shown if backend == "auto" else backend,
        "ckpt": "yes" if grad_ckpt else "no", "trainable_m": n_train / 1e6,
        "params_m": n_params / 1e6, "weights": str(dtype).replace("torch.", ""),
        "step_s": med, "step_p90_s": t["p90"], "step_times_s": times,
        **{f"{k}_s": summarize(v)["median"] for k, v in phases.items()},
        "tokens": tokens, "tokens_per_s": tokens / med, "model_tflop": flops.model / 1e12,
        "hardware_tflop": flops.hardware / 1e12, "tflops": flops.model / med / 1e12,
        "mfu_989": mfu(flops.model, med, H100_PEAK_BF16) if cuda else None,
        "mfu_800": mfu(flops.model, med, H100_MEASURED_BF16) if cuda else None,
        "peak_gib": peak, "flops": flops.as_dict(),
    }
    del wrapped, model, inp, eps
    return row


COLUMNS = [
    ("preset", "preset", ""), ("lora", "LoRA", ""), ("backend", "attention", ""), ("ckpt", "act. ckpt", ""),
    ("params_m", "params M", ",.1f"), ("trainable_m", "trainable M", ",.2f"), ("step_s", "step s (median)", ".3f"),
    ("forward_s", "fwd s", ".3f"), ("backward_s", "bwd s", ".3f"), ("optimizer_s", "optim s", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"), ("model_tflop", "TFLOP/step", ".4g"), ("tflops", "TFLOP/s", ".4g"),
    ("mfu_989", "MFU (989)", ".1%"), ("mfu_800", "MFU (800)", ".1%"), ("peak_gib", "peak GiB", ".1f"),
    ("note", "note", ""),
]


def main(argv: list[str] | None = None) -> Report:
    a = parse_args(argv)
    device = torch.device(a.device)
    settings = dict(batch=a.batch, latents=a.latents, latent_hw=f"{a.height}x{a.width}", text=a.text,
                    chunk=a.chunk or "bidirectional", prope=not a.no_camera, optimizer="none" if a.no_optim else a.optim,
                    amp="bf16" if device.type == "cuda" else "fp32", warmup=a.warmup, steps=a.steps)
    command = "python -m benchmarks.train_step " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    report = Report(a.out, "Training step: forward + backward + optimizer" + (" (LoRA)" if a.lora else ""), command,
                    environment(device), settings, COLUMNS)
    print(f"# {report.title}\n# {report.env}\n# {settings}\n{report.header()}", flush=True)
    for name in a.preset:
        for backend in a.backend:
            def oom(ckpt: bool, message: str, name: str = name, backend: str = backend) -> None:
                report.add({"preset": name, "lora": f"r{a.lora_rank}" if a.lora else "no", "backend": backend,
                            "ckpt": "yes" if ckpt else "no", "note": f"out of memory: {message}"})

            row = with_oom_retry(lambda ckpt: bench_train(a, name, backend, ckpt, report), ckpt=a.grad_ckpt, retry=a.ckpt_on_oom,
                                 device=device, on_oom=oom)
            if row is not None:
                report.add(row)
    return report


if __name__ == "__main__":
    main()
