"""Per-chunk latency of the rollout sampler with memory, broken down by phase, and frames/s.

The steady state of autoregressive generation at the 480p-like shape: a history longer than the
context window, then one new chunk of 4 latents per repetition along a camera walk (each chunk is
committed, so the history grows as in a game), with a reconstituted context of 20 latents (12
recent + the anchor chunk + 1 retrieved chunk) put into the KV cache for every chunk: the leading
chunks unchanged since the previous chunk are kept (``RolloutConfig.reuse_context``; the anchor
always, the retrieved chunk when the walk keeps it), the rest re-encoded; 256 text tokens.

    python -m benchmarks.rollout                                       # base: 4-step distilled, then 50-step CFG
    python -m benchmarks.rollout --settings distilled --autoencoder patch   # DiT only, no VAE
    python -m benchmarks.rollout --preset tiny --device cpu --height 4 --width 6 --text 8 --autoencoder patch \\
        --reps 2 --guided-steps 3

Settings: ``distilled`` = the 4-step schedule without guidance (WorldPlay's real-time setting);
``guided`` = ``--guided-steps`` Euler steps with classifier-free guidance (two branches, each with
its own cache: 2 context passes and 2 model calls per step). Phases, timed with CUDA events recorded
by forward hooks on the model (no host synchronisation is added to the sampler's loop):

* context pass: ``fill_context_cache`` over the context latents (one per branch);
* step k: each denoising model call over the 4 current latents, attending to text + context;
* sampler: everything else in ``Rollout.step`` (memory selection by frustum overlap, gathers,
  noise draws, Euler / re-noise updates);
* decode: the autoencoder on the chunk plus ``--decode-overlap`` earlier latents, as the player does
  (``infer/player.py``), timed separately; the chunk's 16 frames (temporal stride 4) are kept.

frames/s = 16 / chunk time (DiT only) and 16 / (chunk + decode) (sequential, no overlap of the two).
TFLOP/s use benchmarks/flops.py for the context pass and the cached steps. The model runs in
``--dtype`` weights (bf16 on CUDA) without autocast, like ``WorldPlayer``; the HunyuanVideo-1.5 VAE is
diffusers' ``AutoencoderKLHunyuanVideo15`` at its released configuration with random weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.flops import worlddit_flops
from benchmarks.kernel_profile import format_profile, profile_kernels
from benchmarks.timing import EventTimer, Report, environment, peak_memory_gib, reset_peak_memory, time_calls
from benchmarks.train_step import build_worlddit, camera_walk, normalized_K
from data.geometry import invert_rigid
from infer.config import PlayerConfig
from infer.timing import summarize
from models.autoencoders import Autoencoder, AutoencoderConfig, HunyuanVideo15VAE, build_autoencoder
from models.config import PRESETS, preset
from models.memory import MemoryConfig
from models.rollout import Rollout, RolloutConfig

__all__ = ["PhaseHooks", "build_autoencoder_for_bench", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=sorted(PRESETS))
    p.add_argument("--height", type=int, default=30, help="latent height")
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--chunk", type=int, default=4, help="latents per chunk")
    p.add_argument("--context", type=int, default=20, help="context latents (recent + anchor + retrieved)")
    p.add_argument("--history", type=int, default=None, help="latents already generated (default: context + 3 chunks)")
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=["distilled", "guided"], choices=["distilled", "guided"])
    p.add_argument("--guided-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--autoencoder", default=None, choices=["hunyuan15", "patch", "none"],
                   help="default: hunyuan15 on CUDA, patch on CPU; none skips the decode")
    p.add_argument("--decode-overlap", type=int, default=PlayerConfig.decode_overlap)
    p.add_argument("--profile", action="store_true", help="after timing, profile one chunk: device time per kernel category")
    p.add_argument("--warmup", type=int, default=2, help="untimed chunks before the distilled setting")
    p.add_argument("--reps", type=int, default=8, help="timed chunks of the distilled setting")
    p.add_argument("--guided-reps", type=int, default=1, help="timed chunks of the guided setting (after a 2-step warm-up)")
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="model weights (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md (rewritten after every row)")
    return p.parse_args(argv)


class PhaseHooks:
    """Forward hooks that mark a timer around every model call: the gap before a call is "sampler",
    the call itself "context" (cache fill), "text" (text cache fill) or ``step_label(k)`` for the k-th
    denoising call of the repetition."""

    def __init__(self, model: nn.Module, step_label):
        self.timer: EventTimer | None = None
        self.calls = 0
        self.step_label = step_label
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def start(self, timer: EventTimer) -> None:
        self.timer, self.calls = timer, 0

    def _pre(self, module, args, kwargs) -> None:
        if self.timer is not None:
            self.timer.mark("sampler")

    def _post(self, module, args, kwargs, output) -> None:
        if self.timer is None:
            return
        fill = kwargs.get("fill")
        if fill is None:
            self.calls += 1
            self.timer.mark(self.step_label(self.calls))
        else:  # "extend": a context fill that kept the leading chunks of the previous one
            self.timer.mark("context" if fill == "extend" else fill)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def build_autoencoder_for_bench(kind: str, device: torch.device, dtype: torch.dtype, latent_hw: tuple[int, int]) -> Autoencoder | None:
    """The benchmark's autoencoder on ``device``: HunyuanVideo-1.5 (random weights), a patch AE, or None."""
    if kind == "none":
        return None
    if kind == "hunyuan15":
        from diffusers import AutoencoderKLHunyuanVideo15

        torch.manual_seed(0)
        with torch.device(device):
            vae = AutoencoderKLHunyuanVideo15()  # the released configuration (1.26B parameters), random weights
        return HunyuanVideo15VAE(vae.to(dtype)).to(device)
    p = 16 if min(latent_hw) >= 16 else 2
    return build_autoencoder(AutoencoderConfig(kind="patch", patch_size=p, temporal_patch=4)).to(device)


def _history(rollout: Rollout, *, batch: int, channels: int, h: int, w: int, history: int, chunk: int, chunks: int,
             text: Tensor | None, num_actions: int, device: torch.device):
    """A rollout state holding ``history`` random clean latents along a camera walk, and the conditioning
    (actions, w2c, K; each [B, chunks * chunk, ...]) of the walk's next ``chunks`` chunks."""
    g = torch.Generator().manual_seed(0)
    n = history + chunks * chunk
    c2w = camera_walk(batch, n, g)
    w2c, K = invert_rigid(c2w), normalized_K(batch, n, h * 16, w * 16)
    actions = torch.randint(0, num_actions, (batch, n), generator=g)
    image = torch.randn(batch, channels, h, w, generator=g).to(device)
    state = rollout.start(image, text)
    past = slice(0, history)
    rollout.extend(state, torch.randn(batch, channels, history, h, w, generator=g).to(device), actions[:, past].to(device),
                   w2c[:, past].to(device), K[:, past].to(device))
    new = slice(history, n)
    return state, (actions[:, new].to(device), w2c[:, new].to(device), K[:, new].to(device))


def main(argv: list[str] | None = None) -> Report:
    a = parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if cuda else "fp32")]
    kind = a.autoencoder or ("hunyuan15" if cuda else "patch")
    history = a.history or a.context + 3 * a.chunk
    if history < a.context or history % a.chunk:
        raise SystemExit(f"rollout: --history {history} must be a multiple of --chunk {a.chunk} and >= --context {a.context}")

    reset_peak_memory(device)
    ae = build_autoencoder_for_bench(kind, device, dtype, (a.height, a.width))
    cfg = preset(a.preset)
    if ae is not None:
        cfg = replace(cfg, latent_channels=ae.latent_channels)
    model = build_worlddit(cfg, device, dtype).eval().requires_grad_(False)
    stride = ae.temporal_stride if ae is not None else 4
    frames = a.chunk * stride
    text = torch.randn(1, a.text, cfg.text_dim, generator=torch.Generator().manual_seed(1)).to(device) if a.text else None
    mem = MemoryConfig(temporal_latents=a.context - 2 * a.chunk, spatial_chunks=1, anchor=True, chunk_size=a.chunk,
                       max_context=a.context)

    settings = dict(preset=a.preset, latent_hw=f"{a.height}x{a.width}", chunk=a.chunk, context=a.context, history=history,
                    text=a.text, weights=str(dtype).replace("torch.", ""), autoencoder=kind,
                    decode_overlap=a.decode_overlap, frames_per_chunk=frames)
    command = "python -m benchmarks.rollout " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    columns = [("setting", "setting", ""), ("phase", "phase", ""), ("calls", "calls", ""), ("median_ms", "median ms", ".1f"),
               ("tflops", "TFLOP/s", ".4g"), ("fps", "frames/s", ".1f"), ("peak_gib", "peak GiB", ".1f"), ("note", "note", "")]
    report = Report(a.out, f"Rollout with memory: per-chunk breakdown ({a.preset})", command, environment(device), settings, columns)
    print(f"# {report.title}\n# {report.env}\n# {settings}\n{report.header()}", flush=True)
    generator = torch.Generator(device).manual_seed(0)
    chunk_s: float | None = None

    for setting in a.settings:
        guided = setting == "guided"
        rcfg = RolloutConfig(chunk_size=a.chunk, memory=mem, context_sigma=0.014,
                             schedule="euler" if guided else "distilled", steps=a.guided_steps if guided else 4,
                             guidance=a.guidance if guided else 1.0)
        rollout = Rollout(model, rcfg)
        n_chunks = (2 + a.guided_reps if guided else a.warmup + a.reps) + (2 if a.profile else 0)
        state, walk = _history(rollout, batch=1, channels=cfg.latent_channels, h=a.height, w=a.width,
                               history=history, chunk=a.chunk, chunks=n_chunks, text=text,
                               num_actions=cfg.num_actions, device=device)
        hooks = PhaseHooks(model, (lambda k: "denoise") if guided else (lambda k: f"step {k}"))
        records = []

        used = [0]  # chunks of the walk consumed so far

        def next_chunk() -> tuple[Tensor, Tensor, Tensor]:
            s = slice(used[0] * a.chunk, (used[0] + 1) * a.chunk)
            used[0] += 1
            return walk[0][:, s], walk[1][:, s], walk[2][:, s]

        def chunk(timer: EventTimer) -> None:
            hooks.start(timer)
            records.append(rollout.step(state, *next_chunk(), generator))  # commits: the walk goes on
            hooks.timer = None  # the time after the last model call is the sampler's too (rest_name)

        with torch.inference_mode():
            if guided:  # warm both branches' caches and kernels on two short chunks (a full and a reusing fill)
                for _ in range(2):
                    rollout.step(state, *next_chunk(), generator, exit_step=1)
            reset_peak_memory(device)
            times, phases = time_calls(chunk, warmup=0 if guided else a.warmup, reps=a.guided_reps if guided else a.reps,
                                       device=device, rest_name="sampler")
        hooks.remove()
        peak = peak_memory_gib(device)
        if a.profile and not guided:
            with torch.inference_mode():
                prof = profile_kernels(lambda: EventTimer(device).once(chunk), device)
            report.section(format_profile(f"one {a.preset} chunk ({setting}, context {a.context})", prof))
        M = int(records[-1].context_idx.shape[-1])
        label = f"{rollout.num_steps}-step {'CFG ' + str(a.guidance) if guided else 'distilled'}"
        branches = 2 if guided else 1
        ctx_chunk = a.chunk if rcfg.context_causal else None
        ctx_flops = sum(worlddit_flops(cfg, batch=1, frames=M, height=a.height, width=a.width, text=t, chunk=ctx_chunk,
                                       fill="context").forward for t in ([a.text, 0] if guided else [a.text]))  # uncond: no text
        step_flops = worlddit_flops(cfg, batch=1, frames=a.chunk, height=a.height, width=a.width, text=a.text,
                                    chunk=a.chunk, context=M, cached=True).forward
        uncond_flops = worlddit_flops(cfg, batch=1, frames=a.chunk, height=a.height, width=a.width, text=0,
                                      chunk=a.chunk, context=M, cached=True).forward
        note = "" if M == a.context else f"context held {M} latents, not {a.context}"
        timed = records[-len(times):]
        if "context" in phases:  # a chunk whose whole context was kept made no context call: 0 ms
            phases["context"] += [0.0] * (len(times) - len(phases["context"]))
        reused = [r.context_reused for r in timed]
        reuse_note = f"context latents kept from the previous chunk: {reused}"
        steps = sorted((k for k in phases if k.startswith("step")), key=lambda k: int(k.split()[1]))
        order = ["context", "text", *steps, "denoise", "sampler"]
        for name in [k for k in order if k in phases]:
            secs = phases[name]
            med = summarize(secs)["median"]
            row: dict[str, Any] = {"setting": label, "phase": name, "median_ms": med * 1e3, "times_s": secs, "context_latents": M}
            if name == "context":  # TFLOP/s of a full re-encode (kept chunks make the pass shorter than that)
                row.update(calls=branches, tflops=ctx_flops / med / 1e12, phase=f"context pass ({M} latents)",
                           note=reuse_note, context_reused=reused)
            elif name == "denoise":
                calls = 2 * rollout.num_steps
                per_call = (step_flops + uncond_flops) / 2
                row.update(calls=calls, tflops=per_call * calls / med / 1e12, note=f"{med / calls * 1e3:.1f} ms per call")
            elif name.startswith("step"):
                row.update(calls=1, tflops=step_flops / med / 1e12)
            elif name == "text":
                row.update(calls=branches, phase="text cache fill (first chunk only)")
            else:
                row.update(phase="sampler (memory selection, noise, updates)")
            report.add(row)
        t = summarize(times)
        chunk_s = t["median"] if not guided else chunk_s
        report.add({"setting": label, "phase": "chunk total (DiT)", "median_ms": t["median"] * 1e3, "times_s": times,
                    "fps": frames / t["median"], "peak_gib": peak, "note": note or f"p90 {t['p90'] * 1e3:.1f} ms",
                    "context_latents": M})

    if ae is not None:
        T_dec = a.decode_overlap + a.chunk
        lat = torch.randn(1, cfg.latent_channels, T_dec, a.height, a.width, generator=torch.Generator().manual_seed(2)).to(device)

        def decode(_timer: EventTimer) -> None:
            ae.decode(lat)

        reset_peak_memory(device)
        with torch.inference_mode():
            times, _ = time_calls(decode, warmup=1, reps=a.decode_reps, device=device)
        d = summarize(times)["median"]
        report.add({"setting": kind, "phase": f"decode ({T_dec} latents -> keep {frames} frames)", "median_ms": d * 1e3,
                    "times_s": times, "fps": frames / d, "peak_gib": peak_memory_gib(device)})
        if chunk_s is not None:
            report.add({"setting": "distilled + decode", "phase": "chunk + decode (sequential)",
                        "median_ms": (chunk_s + d) * 1e3, "fps": frames / (chunk_s + d)})
    return report


if __name__ == "__main__":
    main()
