r"""``python -m infer``: render a video from a bundle, an image and a camera path.

    python -m infer --bundle outputs/demo/midtrain/export/bundle --image outputs/demo/first_frame.png \
        --pose "w-3, right-4, w-4, left-4, s-4, d-4" --out outputs/demo/walk.mp4 [--prompt TEXT] [--steps N] \
        [--guidance S] [--seed N] [--device cpu|cuda] [--dtype fp32|bf16] [--offload] [--threads N] \
        [--weights model|raw] [--adapter RUN/export/adapter]

``--bundle`` is a bundle directory or a run directory (its ``export/bundle``); ``--adapter`` folds a
LoRA run's adapter into it (the base bundle plus the fine-tune). ``--pose`` is a WorldPlay
per-latent pose JSON or a pose string (``infer.trajectory``; keys that cancel, ``w+s``, are an error).

``--video clip.mp4`` instead of ``--image`` starts from a video: its last frames that fill whole
chunks (at most ``--video-latents``) are encoded into the history before the first generated chunk
(``WorldPlayer.reset_video``), so the memory can retrieve them. With a pose JSON, its first latents
are the video's camera and the rest are generated (the files ``python -m infer.serve`` downloads);
with a pose string, the moves are those after the video and the video's camera is taken as still. Sampling
defaults (steps, schedule, guidance, memory, resolution, frame rate) come from the bundle. Writes
OUT.mp4 and OUT.json (poses and action ids used, settings, timings), atomically. A thin loop over
:class:`infer.player.WorldPlayer`: reset with the image, then one step per chunk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from data.video import VideoError
from infer.config import PlayerConfig, available_cpus, default_threads, resolve_settings
from infer.errors import InferError
from data.geometry import crop_intrinsics, resize_intrinsics
from data.latents import latent_groups
from data.transforms import crop_box
from data.video import read_mp4
from infer.image import center_crop_box, read_image
from infer.player import ChunkTiming, WorldPlayer
from infer.sidecar import build_sidecar, sidecar_path_for, write_outputs
from infer.trajectory import Trajectory, check_length, load_trajectory, move_slices
from models.bundle import BundleError, find_bundle_dir, read_bundle_config, read_bundle_meta


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle directory (model.safetensors, config.yaml, meta.json), or a run "
                   "directory (its export/bundle)")
    p.add_argument("--weights", choices=["model", "raw"], default="model",
                   help="model: what the bundle runs (its EMA where the run kept one); raw: model_raw.safetensors, the trained "
                        "weights without averaging (with --adapter: adapter.safetensors or adapter_raw.safetensors)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (<run>/export/adapter) folded into --bundle, "
                   "the base bundle the LoRA run started from")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--image", help="first frame (PNG/JPG); centre-cropped and resized to the bundle's size")
    start.add_argument("--video", help="start from a video (mp4): its frames become the history (see above)")
    p.add_argument("--video-latents", type=int, default=None, help="at most this many history latents from --video")
    p.add_argument("--pose", required=True, help="WorldPlay pose JSON path, or a pose string like 'w-3, right-1, d-4'")
    p.add_argument("--out", required=True, help="output .mp4 (added to a name without a suffix); the sidecar goes to OUT.json")
    p.add_argument("--prompt", default=None, help="text prompt (default: no text tokens)")
    p.add_argument("--negative-prompt", default=None, help="prompt of the unconditional branch under guidance")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (euler schedule); default: the bundle's")
    p.add_argument("--schedule", choices=["euler", "distilled"], default=None)
    p.add_argument("--shift", type=float, default=None, help="timestep shift of the euler schedule")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (1 = no unconditional branch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="DiT weights (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--offload", action="store_true", help="keep the text encoder and autoencoder on CPU when not in use")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: the available CPUs not busy with other work, at least 1; "
                        "every core on a busy machine makes CPU inference many times slower)")
    p.add_argument("--height", type=int, default=None, help="video height if the bundle does not record it")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the bundle's)")
    p.add_argument("--decode-overlap", type=int, default=PlayerConfig.decode_overlap,
                   help="earlier latents decoded in front of each chunk, for an autoencoder without a streaming decoder "
                        "(every built-in one streams: frames equal the whole-video decode)")
    p.add_argument("--sidecar", default=None, help="sidecar path (default: OUT with .json)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p.parse_args(argv)


def player_config(args: argparse.Namespace) -> PlayerConfig:
    """The PlayerConfig the flags describe (device / dtype defaults resolved)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"--device {device}: CUDA is not available on this machine")
    dtype = args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    return PlayerConfig(
        device=device, dtype=dtype, offload=args.offload, seed=args.seed, decode_overlap=args.decode_overlap,
        steps=args.steps, schedule=args.schedule, shift=args.shift, guidance=args.guidance,
        height=args.height, width=args.width, fps=args.fps, negative_prompt=args.negative_prompt,
        weights=args.weights, adapter=args.adapter,
    )


def render(
    player: WorldPlayer,
    trajectory: Trajectory,
    image,
    prompt: Optional[str] = None,
    *,
    seed: Optional[int] = None,
    on_chunk: Optional[Callable[[ChunkTiming], None]] = None,
) -> np.ndarray:
    """Frames uint8 [F, H, W, 3] of a whole trajectory: reset, then one player.step per chunk."""
    check_length(trajectory.num_latents, player.unit, player.rollout_cfg.mode, player.temporal_stride,
                 where=f"--pose {trajectory.spec!r}")
    player.reset(image, prompt, K=trajectory.K[0], seed=seed)
    frames = []
    for sl in move_slices(trajectory.num_latents, player.unit):
        frames.append(player.step(poses=trajectory.c2w[sl], K=trajectory.K[sl]))
        if on_chunk is not None:
            on_chunk(player.chunk_timings[-1])
    return np.concatenate(frames)


def render_from_video(
    player: WorldPlayer,
    trajectory: Trajectory,
    video: np.ndarray,
    prompt: Optional[str] = None,
    *,
    max_latents: Optional[int] = None,
    seed: Optional[int] = None,
    on_chunk: Optional[Callable[[ChunkTiming], None]] = None,
) -> np.ndarray:
    """Frames [F, H, W, 3] of a video start: the video's frames used, then the generated chunks.

    A pose JSON trajectory holds the whole path: its first P latents (P = the video's history
    latents) are the video's camera, the rest are generated. A pose string holds the moves after
    the video, whose camera is taken as still.
    """
    F, (H, W), u = video.shape[0], (player.height, player.width), player.unit
    P = player.prefix_latents(F, max_latents)
    if trajectory.source == "json":
        if P == 0 or trajectory.num_latents <= P:
            raise InferError(f"--pose {trajectory.spec!r}: {trajectory.num_latents} latents, but the video alone takes {P}; "
                             "a pose JSON with --video holds the video's latents and then the generated ones")
        check_length(trajectory.num_latents - P, u, player.rollout_cfg.mode, player.temporal_stride,
                     where=f"--pose {trajectory.spec!r} after the video's {P} latents")
        n = 1 + player.temporal_stride * (P - 1)
        c2w = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)  # frames before the used ones are ignored
        K_model = resize_intrinsics(trajectory.K[:P], (1, 1), (H, W))  # normalised -> pixels of the model's frame
        top, left, ch, cw = crop_box(video.shape[1:3], (H, W))
        K_in = crop_intrinsics(resize_intrinsics(K_model, (H, W), (ch, cw)), -top, -left)  # ... -> the input frame
        K = torch.eye(3, dtype=torch.float64).repeat(F, 1, 1)
        for i, group in enumerate(latent_groups(n, player.temporal_stride)):  # each frame takes its latent's camera
            for f in group:
                c2w[F - n + f], K[F - n + f] = trajectory.c2w[i], K_in[i]
        used = player.reset_video(video, prompt, c2w=c2w, K=K, max_latents=max_latents, seed=seed)
        poses, Ks = trajectory.c2w[P:], trajectory.K[P:]
    else:
        check_length(trajectory.num_latents - 1, u, player.rollout_cfg.mode, player.temporal_stride,
                     where=f"--pose {trajectory.spec!r} (moves after the video)")
        used = player.reset_video(video, prompt, max_latents=max_latents, seed=seed)
        poses, Ks = player.poses[-1] @ trajectory.c2w[1:], trajectory.K[1:]
    frames = [used]
    for s in range(0, poses.shape[0], u):
        frames.append(player.step(poses=poses[s : s + u], K=Ks[s : s + u]))
        if on_chunk is not None:
            on_chunk(player.chunk_timings[-1])
    return np.concatenate(frames)


def output_path(out: str) -> Path:
    """``--out`` as an mp4 path: ``.mp4`` added to a name without a suffix, any other suffix refused."""
    path = Path(out)
    if path.is_dir():
        raise InferError(f"--out {path}: is a directory; give a file name like {path / 'video.mp4'}")
    if path.suffix == "":
        return path.with_name(path.name + ".mp4")
    if path.suffix.lower() != ".mp4":
        raise InferError(f"--out {path}: the video is written as H.264 mp4; give a name ending in .mp4")
    return path


def image_note(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Optional[str]:
    """What framing does to the start image when it drops much of it or enlarges it; None otherwise."""
    _, _, ch, cw = center_crop_box(src_hw, dst_hw)
    kept = ch * cw / (src_hw[0] * src_hw[1])
    notes = []
    if kept < 0.8:
        notes.append(f"centre-cropped to {cw}x{ch} (keeping {kept:.0%} of it) for the bundle's {dst_hw[1]}x{dst_hw[0]} aspect")
    if dst_hw[0] > ch:
        notes.append(f"upscaled {dst_hw[0] / ch:.3g}x to {dst_hw[1]}x{dst_hw[0]} (smaller than the video: expect blur)")
    return f"image {src_hw[1]}x{src_hw[0]} is " + " and ".join(notes) if notes else None


def set_threads(threads: Optional[int], device: str) -> Optional[int]:
    """Set torch's CPU threads for a CPU run (``--threads``, else :func:`infer.config.default_threads`); None on a GPU."""
    if threads is not None and threads < 1:
        raise InferError(f"--threads must be >= 1, got {threads}")
    if torch.device(device).type != "cpu" and threads is None:
        return None
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def check_adapter_base(adapter: str, bundle_dir: Path, log: Callable[[str], None]) -> None:
    """Warn when ``--adapter`` was trained on another base bundle than ``--bundle`` (config hashes differ)."""
    import json

    try:
        base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base") or {}
    except (OSError, ValueError):
        return  # loading the adapter names the problem
    own = read_bundle_meta(bundle_dir).get("config_hash")
    if base.get("config_hash") and base["config_hash"] != own:
        log(f"warning: --adapter {adapter} was trained on the bundle {base.get('path')} (config {base['config_hash']}), "
            f"--bundle {bundle_dir} has config {own}")


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """Validate inputs, load, render, write; returns the mp4 path. Raises on bad input before writing anything."""
    out = output_path(args.out)
    bundle_dir = find_bundle_dir(args.bundle)
    if bundle_dir != Path(args.bundle):
        log(f"--bundle {args.bundle}: using the bundle {bundle_dir}")
    # fail on a missing / unreadable start before loading any weights
    start_video = read_mp4(args.video) if args.video is not None else None
    start_image = read_image(args.image) if start_video is None else None
    cfg = player_config(args)
    rcfg, video = resolve_settings(read_bundle_config(bundle_dir)["sampling"], cfg, f"bundle {bundle_dir}")
    start_hw = (start_image if start_image is not None else start_video[0]).shape[:2]
    note = image_note(start_hw, (video.height, video.width))
    if note:
        log(f"note: {note}")
    if args.adapter:
        check_adapter_base(args.adapter, bundle_dir, log)
    threads = set_threads(args.threads, cfg.device)
    if threads is not None:
        log(f"CPU threads: {threads} of {available_cpus()} available (--threads N to change)")
    traj = load_trajectory(args.pose, height=video.height, width=video.width, steps=video.steps,
                           thresholds=video.thresholds, fov_x_deg=video.fov_x_deg)

    player = WorldPlayer.from_bundle(bundle_dir, cfg)
    if start_video is None:
        check_length(traj.num_latents, player.unit, rcfg.mode, player.temporal_stride, where=f"--pose {args.pose!r}")
        n_chunks = traj.num_latents // player.unit
    else:
        history = player.prefix_latents(start_video.shape[0], args.video_latents)
        n_chunks = (traj.num_latents - (history if traj.source == "json" else 1)) // player.unit
        log(f"video {args.video}: {start_video.shape[0]} frames -> {history} latents of history")
    meta = player.bundle.meta
    log(f"bundle {bundle_dir}: stage {meta.get('stage')}, step {meta.get('step')}, {cfg.weights} weights"
        f"{f' + adapter {args.adapter}' if args.adapter else ''}; {cfg.device} {cfg.dtype}; "
        f"{rcfg.mode} mode, {player.unit} latents per chunk, {player.rollout.num_steps} steps ({rcfg.schedule}), "
        f"guidance {rcfg.guidance}; {player.height}x{player.width} at {player.fps:g} fps; loaded in {player.load_seconds:.2f} s")
    log(f"trajectory ({traj.source}): {traj.num_latents} latents -> {player.bundle.autoencoder.num_frames(traj.num_latents)} "
        f"frames in {n_chunks} chunks")

    def on_chunk(c: ChunkTiming) -> None:
        log(f"chunk {c.index + 1}/{n_chunks}: latents {c.start}-{c.start + c.num_latents - 1}, {c.num_frames} frames, "
            f"context {c.context_latents} latents, {c.total_s:.3f} s (model {c.model_s:.3f}, decode {c.decode_s:.3f})")

    if start_video is None:
        frames = render(player, traj, args.image, args.prompt, seed=args.seed, on_chunk=on_chunk)
    else:
        frames = render_from_video(player, traj, start_video, args.prompt, max_latents=args.video_latents,
                                   seed=args.seed, on_chunk=on_chunk)
    sidecar = build_sidecar(player, out=out, image=None if args.image is None else str(args.image), trajectory=traj)
    sidecar["inputs"]["video"] = args.video
    sidecar["settings"]["threads"] = threads  # torch CPU threads (None: a GPU run with the default)
    side = write_outputs(out, frames, player.fps, sidecar, Path(args.sidecar) if args.sidecar else sidecar_path_for(out))
    t = sidecar["timings"]
    lat = t["chunk_latency_s"]
    log(f"timings: load {t['load_s']:.2f} s | time to first chunk {t['time_to_first_chunk_s']:.3f} s | chunk latency "
        f"median {lat['median']:.3f} s, p90 {lat['p90']:.3f} s | {t['frames_per_s']:.1f} frames/s generated")
    log(f"wrote {out} ({frames.shape[0]} frames, {player.fps:g} fps) and {side}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(f"infer: {s}", flush=True))
    try:
        run(args, log)
    except (InferError, BundleError, VideoError, FileNotFoundError, KeyError) as e:
        print(f"infer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
