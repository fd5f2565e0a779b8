"""Play-server latency and throughput (issue 19): key press -> first frame that reflects it, and frames/s
delivered to the page, through the real server (``infer.serve``) and, where Chromium is installed,
the real page in a headless browser.

Two runs on one bundle:

1. **Interactive** (pacing on, as ``python -m infer.serve`` runs): the key state changes ``--presses``
   times at random moments; each change is timed from the key event (the page's keydown handler,
   ``performance.now()``) to the moment the first frame of a chunk generated with that key state is
   *drawn* on the page (the page's own key->frame figure). Frames/s delivered = frames received by
   the page per second over the run (with pacing it should equal the video's frame rate when the
   model keeps up).
2. **Throughput** (``--no-pace``): chunks back to back, frames/s received by the page over
   ``--seconds`` after a warm-up: what the model + decode + JPEG + socket deliver at most.

``--client ws`` (or ``auto`` without Chromium) uses a Python WebSocket client speaking the page's
protocol instead; its key->frame is from sending the key state to *receiving* the first frame (no
display queue), so it reads lower than the browser's.

    python -m benchmarks.serve_latency --preset demo --device cpu                 # the demo's shape, random weights
    python -m benchmarks.serve_latency --preset base --device cuda --dtype bf16   # WorldPlay-like 480p, random weights
    python -m benchmarks.serve_latency --bundle outputs/demo/midtrain/export/bundle

``base`` builds the bundle with ``benchmarks.infer_speed`` (480x832, HunyuanVideo-1.5 VAE when
diffusers is importable, 4-step distilled schedule, chunks of 4 latents, 20-latent context).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from infer.config import PlayerConfig
from infer.serve import ServeConfig, Server, run_in_thread
from models.autoencoders import AutoencoderConfig
from models.bundle import save_bundle
from models.config import preset
from models.dit import WorldDiT
from models.memory import MemoryConfig
from models.rollout import RolloutConfig
from models.text_encoders import TextEncoderConfig

KEY_SETS = [["w"], ["d"], ["w", "left"], ["a"], ["w", "right"], ["s"], ["up"], []]
CODES = {"w": "KeyW", "a": "KeyA", "s": "KeyS", "d": "KeyD", "left": "ArrowLeft", "right": "ArrowRight", "up": "ArrowUp", "down": "ArrowDown"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="an existing bundle (default: build a random one of --preset)")
    p.add_argument("--preset", default="demo", choices=["demo", "tiny", "small", "base", "hy15"],
                   help="demo = configs/experiment/demo.yaml's model at 32x32 (tiny preset widened), else a WorldDiT preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--client", default="auto", choices=["auto", "browser", "ws"])
    p.add_argument("--presses", type=int, default=16, help="key-state changes timed in the interactive run")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the throughput window")
    p.add_argument("--warmup-chunks", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def demo_bundle(directory: Path) -> Path:
    """The demo experiment's model and sampling (configs/experiment/demo*.yaml) with random weights."""
    cfg = replace(preset("tiny"), latent_channels=48, text_dim=0, hidden=96, heads=6, head_dim=16, rope_dims=[4, 6, 6])
    torch.manual_seed(0)
    model = WorldDiT(cfg)
    with torch.no_grad():  # the default init zeroes the output layers: give the frames something to show
        for prm in model.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    mem = MemoryConfig(chunk_size=4, temporal_latents=4, spatial_chunks=1, anchor=True, max_context=12, distance_cut=4.0)
    sampling = asdict(RolloutConfig(chunk_size=4, steps=12, shift=3.0, memory=mem))
    sampling.update(height=32, width=32, fps=16.0, model_type="ar")
    return save_bundle(directory / "bundle", model, model_cfg=cfg, autoencoder_cfg=AutoencoderConfig(kind="patch", patch_size=4),
                       text_encoder_cfg=TextEncoderConfig(kind="none", dim=0), sampling=sampling,
                       meta={"stage": "benchmark"}, overwrite=True)


def make_bundle(a: argparse.Namespace, directory: Path) -> Path:
    if a.bundle:
        return Path(a.bundle)
    if a.preset == "demo":
        return demo_bundle(directory)
    from benchmarks import infer_speed

    b = infer_speed.parse_args(["--preset", a.preset, "--device", a.device, "--text-tokens", "0"]
                               + (["--dtype", a.dtype] if a.dtype else []))
    b.latent_height, b.latent_width = (6, 10) if a.preset == "tiny" else (30, 52)
    b.dtype = b.dtype or ("bf16" if torch.device(a.device).type == "cuda" else "fp32")
    if b.autoencoder is None:
        try:
            import diffusers  # noqa: F401

            b.autoencoder = "hunyuan15" if a.preset != "tiny" else "patch"
        except ImportError:
            b.autoencoder = "patch"
    return infer_speed.build_bundle(b, directory)


def start_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:360, 0:640]
    img = np.stack([128 + 100 * np.sin(x / 37.0 + c) * np.cos(y / 23.0) for c in range(3)], -1).astype(np.uint8)
    cv2.imwrite(str(folder / "start.png"), img)
    return folder


# ------------------------------------------------------------------ clients


def browser_session(url: str, workdir: Path, a: argparse.Namespace, interactive: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chromium import Chromium

    with Chromium(workdir) as br:
        br.open(url + "/")
        br.wait_for("document.querySelectorAll('.thumb').length > 0", timeout=120)
        br.click(".thumb[data-index='0']")
        br.wait_for(f"window.worldsmith.stats.chunks >= {a.warmup_chunks}", timeout=600)
        if interactive:
            rng, held = random.Random(0), set()
            info = br.evaluate("window.worldsmith.state.info")
            chunk_s = info["frames_per_chunk"] / info["fps"]
            for i in range(a.presses):
                target = set(KEY_SETS[i % len(KEY_SETS)])
                if target == held:
                    target = {"a"} if held != {"a"} else {"d"}
                before = br.evaluate("window.worldsmith.stats.keyLatencies.length")
                time.sleep(rng.uniform(0.0, chunk_s))  # a random phase within the chunk cycle
                for k in sorted(held - target):
                    br.key(CODES[k], down=False)
                for k in sorted(target - held):
                    br.key(CODES[k], down=True)
                held = target
                if target:  # the page times presses (a release alone is not a press)
                    br.wait_for(f"window.worldsmith.stats.keyLatencies.length > {before}", timeout=600)
            for k in sorted(held):
                br.key(CODES[k], down=False)
            lat = br.evaluate("window.worldsmith.stats.keyLatencies")
            t0, f0 = time.monotonic(), br.evaluate("window.worldsmith.stats.framesReceived")
            time.sleep(a.seconds / 2)
        else:
            lat = []
            t0, f0 = time.monotonic(), br.evaluate("window.worldsmith.stats.framesReceived")
            time.sleep(a.seconds)
        f1, t1 = br.evaluate("window.worldsmith.stats.framesReceived"), time.monotonic()
        chunk_lat = br.evaluate("window.worldsmith.stats.chunkLatencies")
    return {"key_to_frame_ms": lat, "frames_per_s": (f1 - f0) / (t1 - t0), "chunk_latency_s": chunk_lat}


def ws_session(url: str, a: argparse.Namespace, interactive: bool) -> dict[str, Any]:
    from websockets.sync.client import connect

    lat, chunk_lat, frames, header = [], [], [], None
    with connect(url.replace("http://", "ws://") + "/ws", max_size=None) as ws:
        info = json.loads(ws.recv())
        ws.send(json.dumps({"type": "start", "source": "gallery", "index": 0}))

        def pump(until: float, pending: dict[int, float] | None = None) -> None:
            nonlocal header
            while time.perf_counter() < until:
                try:
                    m = ws.recv(timeout=max(0.001, until - time.perf_counter()))
                except TimeoutError:
                    return
                if isinstance(m, str):
                    msg = json.loads(m)
                    if msg["type"] == "chunk":
                        header = dict(msg, first=True)
                        chunk_lat.append(msg["latency_s"])
                    continue
                if header is None:
                    continue
                frames.append(time.perf_counter())
                if header.pop("first", False) and pending:
                    for s in [s for s in pending if s <= header["seq"]]:
                        lat.append(1000 * (time.perf_counter() - pending.pop(s)))

        while len(chunk_lat) < a.warmup_chunks:
            pump(time.perf_counter() + 0.05)
        if interactive:
            rng, chunk_s, pending = random.Random(0), info["frames_per_chunk"] / info["fps"], {}
            for i in range(a.presses):
                pump(time.perf_counter() + rng.uniform(0.0, chunk_s))
                pending[i + 1] = time.perf_counter()
                ws.send(json.dumps({"type": "keys", "held": KEY_SETS[i % (len(KEY_SETS) - 1)], "seq": i + 1}))
                while pending:
                    pump(time.perf_counter() + 0.01, pending)
        n0, t0 = len(frames), time.perf_counter()
        pump(t0 + (a.seconds / 2 if interactive else a.seconds))
        rate = (len(frames) - n0) / (time.perf_counter() - t0)
    return {"key_to_frame_ms": lat, "frames_per_s": rate, "chunk_latency_s": chunk_lat}


def summary(x: list[float]) -> dict[str, float]:
    if not x:
        return {}
    s = sorted(x)
    return {"n": len(s), "median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "min": s[0], "max": s[-1]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chromium import chromium_path

    client = a.client if a.client != "auto" else ("browser" if chromium_path() else "ws")
    dtype = a.dtype or ("bf16" if torch.device(a.device).type == "cuda" else "fp32")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="serve_latency_") as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(a, tmp)
        images = start_image(tmp / "images")
        for run, pace in (("interactive", True), ("throughput", False)):
            app = Server(ServeConfig(bundle=str(bundle), out=str(tmp / "out"), images=str(images), pace=pace),
                         PlayerConfig(device=a.device, dtype=dtype))
            uv, thread, url = run_in_thread(app)
            try:
                if client == "browser":
                    r = browser_session(url, tmp / f"browser_{run}", a, interactive=pace)
                else:
                    r = ws_session(url, a, interactive=pace)
            finally:
                uv.should_exit = True
                thread.join(timeout=30)
            results[run] = {"key_to_frame_ms": summary(r["key_to_frame_ms"]), "frames_per_s": r["frames_per_s"],
                            "chunk_latency_ms": summary([1000 * x for x in r["chunk_latency_s"][a.warmup_chunks:]])}
        results["setup"] = {
            "bundle": str(a.bundle or a.preset), "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else platform.processor() or "cpu",
            "dtype": dtype, "client": client, "video": f"{app.height}x{app.width} @ {app.fps:g} fps",
            "frames_per_chunk": app.unit * app.stride, "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
    s, i, t = results["setup"], results["interactive"], results["throughput"]
    print(f"{s['device']} {s['dtype']} | {s['bundle']} | {s['video']}, {s['frames_per_chunk']} frames per chunk | client {s['client']}")
    k = i["key_to_frame_ms"]
    if k:
        print(f"key -> first frame reflecting it: median {k['median']:.0f} ms, p90 {k['p90']:.0f} ms, min {k['min']:.0f}, max {k['max']:.0f} (n={k['n']})")
    print(f"frames/s delivered: {i['frames_per_s']:.1f} paced (interactive), {t['frames_per_s']:.1f} unpaced (throughput)")
    c = t["chunk_latency_ms"]
    if c:
        print(f"chunk latency (server, unpaced): median {c['median']:.0f} ms, p90 {c['p90']:.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
