r"""``python -m infer``: render a video from a bundle, an image and a camera path.

    python -m infer --bundle outputs/demo/export/bundle --image start.png --pose "w-7, right-4, w-4" \
        --out outputs/demo/walk.mp4 [--prompt TEXT] [--steps N] [--guidance S] [--seed N] \
        [--device cpu|cuda] [--dtype fp32|bf16] [--offload]

``--pose`` is a WorldPlay per-latent pose JSON or a pose string (``infer.trajectory``).

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
from infer.config import PlayerConfig, resolve_settings
from infer.errors import InferError
from data.geometry import crop_intrinsics, resize_intrinsics
from data.latents import latent_groups
from data.transforms import crop_box
from data.video import read_mp4
from infer.image import read_image
from infer.player import ChunkTiming, WorldPlayer
from infer.sidecar import build_sidecar, sidecar_path_for, write_outputs
from infer.trajectory import Trajectory, check_length, load_trajectory, move_slices
from models.bundle import BundleError, read_bundle_config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle directory (model.safetensors, config.yaml, meta.json)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--image", help="first frame (PNG/JPG); centre-cropped and resized to the bundle's size")
    start.add_argument("--video", help="start from a video (mp4): its frames become the history (see above)")
    p.add_argument("--video-latents", type=int, default=None, help="at most this many history latents from --video")
    p.add_argument("--pose", required=True, help="WorldPlay pose JSON path, or a pose string like 'w-3, right-1, d-4'")
    p.add_argument("--out", required=True, help="output mp4; the sidecar goes to OUT.json")
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
    p.add_argument("--height", type=int, default=None, help="video height if the bundle does not record it")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the bundle's)")
    p.add_argument("--decode-overlap", type=int, default=PlayerConfig.decode_overlap,
                   help="earlier latents decoded in front of each chunk (causal VAE context)")
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


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """Validate inputs, load, render, write; returns the mp4 path. Raises on bad input before writing anything."""
    out = Path(args.out)
    if out.is_dir():
        raise InferError(f"--out {out}: is a directory; give a file name like {out / 'video.mp4'}")
    # fail on a missing / unreadable start before loading any weights
    start_video = read_mp4(args.video) if args.video is not None else None
    if start_video is None:
        read_image(args.image)
    cfg = player_config(args)
    rcfg, video = resolve_settings(read_bundle_config(args.bundle)["sampling"], cfg, f"bundle {args.bundle}")
    traj = load_trajectory(args.pose, height=video.height, width=video.width, steps=video.steps,
                           thresholds=video.thresholds, fov_x_deg=video.fov_x_deg)

    player = WorldPlayer.from_bundle(args.bundle, cfg)
    if start_video is None:
        check_length(traj.num_latents, player.unit, rcfg.mode, player.temporal_stride, where=f"--pose {args.pose!r}")
        n_chunks = traj.num_latents // player.unit
    else:
        history = player.prefix_latents(start_video.shape[0], args.video_latents)
        n_chunks = (traj.num_latents - (history if traj.source == "json" else 1)) // player.unit
        log(f"video {args.video}: {start_video.shape[0]} frames -> {history} latents of history")
    meta = player.bundle.meta
    log(f"bundle {args.bundle}: stage {meta.get('stage')}, step {meta.get('step')}; {cfg.device} {cfg.dtype}; "
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
    except (InferError, BundleError, VideoError, FileNotFoundError) as e:
        print(f"infer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
