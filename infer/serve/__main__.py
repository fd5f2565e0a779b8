r"""``python -m infer.serve``: play a bundle's world in the browser.

    python -m infer.serve --bundle outputs/demo/midtrain/export/bundle            # http://127.0.0.1:8000
    python -m infer.serve --bundle B --data outputs/demo/data --port 8080 --max-players 2
    python -m infer.serve --bundle B --images my_pictures/ --prompt "a rainy street" --device cuda

Open the printed address, pick a start image (or drop an image or video on the page), and steer
with W A S D (move) and the arrow keys (turn, look up and down); held keys combine. Sessions are
written under ``--out`` (one directory per connection), and nothing anywhere else. The server
binds 127.0.0.1 unless ``--host`` says otherwise: it runs a model for whoever can reach it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from data.video import VideoError
from infer.__main__ import player_config
from infer.errors import InferError
from infer.serve.app import ServeConfig, Server, uvicorn_config
from models.bundle import BundleError


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    d = ServeConfig(bundle="")
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle directory (model.safetensors, config.yaml, meta.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default=d.out, help="session directories go here (default %(default)s)")
    p.add_argument("--data", default=None, help="dataset (clip contract) whose first frames and clips are the start "
                                                "gallery (default: the bundle's training data, if present)")
    p.add_argument("--images", default=None, help="a folder of PNG/JPG start images for the gallery")
    p.add_argument("--gallery", type=int, default=d.gallery, help="gallery entries per source (default %(default)s)")
    p.add_argument("--prompt", default=None, help="text prompt of every session (default: no text tokens)")
    p.add_argument("--max-players", type=int, default=d.max_players,
                   help="players at once, one per connection; others are told the server is busy (default %(default)s)")
    p.add_argument("--upload-limit-mb", type=float, default=d.upload_limit_mb, help="largest upload (default %(default)s MiB)")
    p.add_argument("--max-upload-frames", type=int, default=d.max_upload_frames, help="longest uploaded video, in frames")
    p.add_argument("--max-session-frames", type=int, default=d.max_session_frames,
                   help="frames one take may record before it pauses (they are kept in memory for the download)")
    p.add_argument("--video-latents", type=int, default=d.video_latents,
                   help="history latents taken from a start video or dataset clip (rounded down to whole chunks)")
    p.add_argument("--format", dest="frame_format", choices=["jpeg", "webp"], default=d.frame_format)
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG/WebP quality of streamed frames")
    p.add_argument("--no-pace", dest="pace", action="store_false",
                   help="generate chunks back to back instead of just in time for playback (throughput tests)")
    # the player's own flags, as in python -m infer
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--schedule", choices=["euler", "distilled"], default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="playback frame rate (default: the bundle's)")
    p.add_argument("--decode-overlap", type=int, default=4)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Server:
    """The server the flags describe (loads the bundle)."""
    cfg = ServeConfig(
        bundle=args.bundle, out=args.out, max_players=args.max_players, upload_limit_mb=args.upload_limit_mb,
        max_upload_frames=args.max_upload_frames, max_session_frames=args.max_session_frames,
        frame_format=args.frame_format, quality=args.quality, pace=args.pace, video_latents=args.video_latents,
        prompt=args.prompt, seed=args.seed, data=args.data, images=args.images, gallery=args.gallery,
    )
    return Server(cfg, player_config(args))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        app = build(args)
    except (InferError, BundleError, VideoError, FileNotFoundError, ValueError) as e:
        print(f"infer.serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"infer.serve: {app.bundle_path} on {app.player_cfg.device} ({app.height}x{app.width} at {app.fps:g} fps, "
          f"{app.unit} latents per chunk), loaded in {app.load_seconds:.2f} s; {len(app.gallery)} start images"
          f"{f' from {app.data}' if app.data else ''}; sessions in {app.out}", flush=True)
    print(f"infer.serve: open http://{host}:{args.port}/  (Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level="warning")).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
