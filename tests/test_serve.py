"""The play server without a browser: routes and path traversal, the player limit, upload limits and
errors, unknown keys, step errors reaching the page, slow clients never holding back generation,
and starting from a video (the player's ``reset_video`` and a dataset clip through the server)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import write_render_dataset
from data.actions import MotionSteps, keys_to_poses
from data.geometry import invert_rigid, make_intrinsics, normalize_intrinsics
from data.latents import latent_poses
from data.poseio import parse_pose_string
from data.video import encode_mp4_bytes
from infer.__main__ import main as infer_main
from infer.config import PlayerConfig
from infer.errors import InferError
from infer.image import to_video_tensor
from infer.player import WorldPlayer
from infer.serve import ServeConfig, Server, run_in_thread
from infer.serve.media import decode_upload, framing
from infer.serve.session import Outbox
from test_infer import H, W, make_bundle

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LIMIT_MB = 0.25  # uploads: 256 KiB


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    bundle = make_bundle(root / "bundle")
    data = write_render_dataset(root / "data", ["w-32", "right-32"], size=32)  # 33 frames = 9 latents each
    app = Server(ServeConfig(bundle=str(bundle), out=str(root / "out"), data=str(data), upload_limit_mb=LIMIT_MB,
                             video_latents=8, max_upload_frames=40), PlayerConfig(fps=48.0))
    uv, thread, url = run_in_thread(app)
    yield {"root": root, "bundle": bundle, "data": data, "app": app, "url": url,
           "ws": url.replace("http://", "ws://") + "/ws"}
    uv.should_exit = True
    thread.join(timeout=10)


def http_get(url: str, raw_path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    """GET a path exactly as written (no client-side normalisation of '..' or %2e)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request(method, raw_path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body, {k.lower(): v for k, v in r.getheaders()}


def recv_json(ws, kind: str | tuple[str, ...], timeout: float = 20.0) -> dict:
    """The next JSON message of ``kind`` (binary frames and other messages are skipped)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(m, str):
            msg = json.loads(m)
            if msg["type"] in kinds:
                return msg


def png_bytes(h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 90)], -1).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


# --------------------------------------------------------------------------- HTTP


def test_routes_and_no_path_traversal(world):
    url, app = world["url"], world["app"]
    status, body, headers = http_get(url, "/")
    assert status == 200 and b"/static/app.js" in body and headers["content-type"].startswith("text/html")
    assert http_get(url, "/static/app.js")[0] == 200
    info = json.loads(http_get(url, "/api/info")[1])
    assert (info["height"], info["width"], info["chunk_latents"], info["frames_per_chunk"]) == (H, W, 4, 16)
    assert [g["clip"] for g in info["gallery"]] == [True, True]
    assert info["upload_limit_bytes"] == int(LIMIT_MB * 2**20) and info["keys"] == ["w", "s", "d", "a", "right", "left", "up", "down"]
    status, body, headers = http_get(url, "/api/gallery/1.jpg")
    assert status == 200 and body[:2] == b"\xff\xd8" and headers["content-type"] == "image/jpeg"

    # A real session file, then every way of walking out of the served directories.
    token = "0" * 32
    app.sessions[token] = Path(world["root"] / "out" / "fake")
    (world["root"] / "out" / "fake").mkdir(parents=True, exist_ok=True)
    (world["root"] / "out" / "fake" / "take1.json").write_text("{}")
    (world["root"] / "secret.json").write_text('{"secret": 1}')
    assert http_get(url, f"/session/{token}/take1.json")[:2] == (200, b"{}")
    for path in ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/../pyproject.toml",
                 f"/session/{token}/../../secret.json", f"/session/{token}/..%2f..%2fsecret.json",
                 f"/session/{token}/%2e%2e/%2e%2e/secret.json", f"/session/{token}/take1.json/../../../secret.json",
                 f"/session/{'1' * 32}/take1.json", "/session/../out/fake/take1.json", "/api/gallery/7.jpg",
                 "/api/gallery/-1.jpg", "/etc/passwd", "//etc/passwd"]:
        status, body, _ = http_get(url, path)
        assert status == 404 and b"secret" not in body, path
    assert http_get(url, "/", method="POST")[0] == 405


# --------------------------------------------------------------------------- players


def test_one_player_per_slot_second_refused_with_message(world):
    with connect(world["ws"]) as a:
        assert recv_json(a, "hello")["active_players"] == 1
        with connect(world["ws"]) as b:
            busy = recv_json(b, "busy")
            assert "1 player slot" in busy["message"] and "--max-players 2" in busy["message"]
            with pytest.raises(ConnectionClosed) as closed:
                b.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
    deadline = time.monotonic() + 10
    while world["app"].active and time.monotonic() < deadline:  # the slot frees when the first player leaves
        time.sleep(0.02)
    with connect(world["ws"]) as c:
        assert recv_json(c, "hello")["type"] == "hello"


def test_cross_origin_websocket_is_refused(world):
    with pytest.raises(Exception):
        with connect(world["ws"], origin="http://evil.example") as ws:
            ws.recv(timeout=5)


def test_bad_input_gets_messages_and_writes_nothing_outside(world):
    out = world["root"] / "out"
    before = {p for p in world["root"].rglob("*") if not p.is_relative_to(out)}
    with connect(world["ws"], max_size=None) as ws:
        recv_json(ws, "hello")
        ws.send(json.dumps({"type": "keys", "held": ["w", "q", "ctrl"], "seq": 1}))
        assert "unknown keys ['ctrl', 'q']" in recv_json(ws, "error")["message"]
        ws.send(json.dumps({"type": "jump"}))
        assert "unknown message type 'jump'" in recv_json(ws, "error")["message"]
        ws.send("not json")
        assert recv_json(ws, "error")["message"] == "not a JSON message"
        ws.send(json.dumps({"type": "start", "source": "gallery", "index": 5}))
        assert "no start image 5" in recv_json(ws, "error")["message"]
        ws.send(json.dumps({"type": "start", "source": "upload"}))
        assert "nothing uploaded yet" in recv_json(ws, "error")["message"]
        ws.send(json.dumps({"type": "save"}))
        assert "nothing to download yet" in recv_json(ws, "error")["message"]

        # Over the size limit: refused from the header, before any bytes.
        ws.send(json.dumps({"type": "upload", "name": "big.png", "size": 300 * 1024}))
        err = recv_json(ws, "error")
        assert err["where"] == "upload" and "0.29 MiB" in err["message"] and "limit is 0.25 MiB" in err["message"]
        ws.send(b"\x89PNG" + b"0" * 100)  # bytes without an accepted header
        assert "unexpected binary message" in recv_json(ws, "error")["message"]

        def upload(data: bytes, name: str = "../../escape.png") -> dict:
            ws.send(json.dumps({"type": "upload", "name": name, "size": len(data)}))
            ws.send(data)
            return recv_json(ws, ("uploaded", "error"))

        assert "neither an image" in upload(b"this is not an image at all" * 10, "notes.png")["message"]
        odd = upload(png_bytes(20, 400))  # 20:1 for a 1.5:1 model
        assert odd["type"] == "error" and "odd aspect ratio" in odd["message"] and "keep only 8%" in odd["message"]
        assert "at least 8 pixels" in upload(png_bytes(4, 6))["message"]
        ok = upload(png_bytes(45, 80))  # 1.78:1: cropped at the sides to 1.5:1
        assert ok["type"] == "uploaded" and ok["kind"] == "image"
        assert ok["framing"] == ("centre-cropped from 80x45 (1.78:1) to 68x45, the model's 1.50:1 (85% kept, cut at "
                                 "left and right), then resized to 24x16")
        ws.send(json.dumps({"type": "start", "source": "upload"}))
        started = recv_json(ws, "started")
        assert started["kind"] == "image" and "centre-cropped" in started["message"]

        # A message beyond the transport limit closes the connection (the page says so); the server lives on.
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(b"0" * (int(LIMIT_MB * 2**20) + 128 * 1024))
            ws.recv(timeout=10)
            ws.recv(timeout=10)
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    with connect(world["ws"]) as again:
        assert recv_json(again, "hello")["type"] == "hello"
    after = {p for p in world["root"].rglob("*") if not p.is_relative_to(out)}
    assert after == before  # nothing written outside the sessions directory
    assert not any(p.name == "escape.png" for p in world["root"].parent.rglob("escape.png"))


def test_video_upload_starts_from_its_frames_with_a_still_camera(world):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (21, 32, 48, 3), dtype=np.uint8)  # 21 frames -> 6 latents -> one 4-latent chunk
    data = encode_mp4_bytes(video, fps=12)
    with connect(world["ws"]) as ws:
        recv_json(ws, "hello")
        ws.send(json.dumps({"type": "upload", "name": "clip.mp4", "size": len(data)}))
        ws.send(data)
        up = recv_json(ws, ("uploaded", "error"))
        assert (up["type"], up["kind"], up["frames"]) == ("uploaded", "video", 21), up
        ws.send(json.dumps({"type": "start", "source": "upload"}))
        started = recv_json(ws, "started")
        assert (started["kind"], started["history_latents"], started["camera"]) == ("video", 4, "unknown, taken as still")
        chunk = recv_json(ws, "chunk")
        assert chunk["context_latents"] == 4 and chunk["frames"] == 16
        too_long = encode_mp4_bytes(np.zeros((41, 16, 24, 3), np.uint8), fps=12)  # over max_upload_frames=40
        ws.send(json.dumps({"type": "upload", "name": "long.mp4", "size": len(too_long)}))
        ws.send(too_long)
        assert "more than 40 frames" in recv_json(ws, "error")["message"]


def test_step_error_reaches_the_page_and_reset_recovers(world):
    app = world["app"]
    with connect(world["ws"]) as ws:
        recv_json(ws, "hello")
        ws.send(json.dumps({"type": "start", "source": "gallery", "index": 0}))
        recv_json(ws, "started")
        first = recv_json(ws, "chunk")
        assert first["index"] == 0 and first["frames"] == 13
        session = next(iter(app.active.values()))
        step = session.player.step

        def broken(*a, **k):
            raise RuntimeError("device lost")

        session.player.step = broken
        err = recv_json(ws, "error")
        assert err["where"] == "step" and "RuntimeError: device lost" in err["message"] and "Reset" in err["message"]
        session.player.step = step
        ws.send(json.dumps({"type": "reset"}))
        assert recv_json(ws, "started")["take"] == 2
        assert recv_json(ws, "chunk")["index"] == 0


def test_slow_client_never_blocks_generation(world):
    """Drive the ASGI app in-process with a client that takes 60 ms per message (a chunk of 17 messages
    takes 1 s to send, 3x its playing time at 48 fps): generation goes on,
    the outbox keeps at most its few chunks, and the page hears how many it missed."""
    app = world["app"]
    sent: list = []

    async def run() -> tuple[int, int]:
        incoming: asyncio.Queue = asyncio.Queue()
        for m in ({"type": "websocket.connect"},
                  {"type": "websocket.receive", "text": json.dumps({"type": "start", "source": "gallery", "index": 1})},
                  {"type": "websocket.receive", "text": json.dumps({"type": "keys", "held": ["d"], "seq": 1})}):
            incoming.put_nowait(m)

        async def receive():
            return await incoming.get()

        async def send(message):
            sent.append(message)
            if message["type"] == "websocket.send":
                await asyncio.sleep(0.06)

        scope = {"type": "websocket", "path": "/ws", "headers": []}
        task = asyncio.create_task(app(scope, receive, send))
        while not app.active:
            await asyncio.sleep(0.01)
        session = next(iter(app.active.values()))
        while len(session.player.chunk_timings) < 12:
            await asyncio.sleep(0.02)
        generated, pending = len(session.player.chunk_timings), sum(i[0] == "chunk" for i in session.outbox.items)
        incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 30)
        return generated, pending

    generated, pending = asyncio.run(run())
    headers = [json.loads(m["text"]) for m in sent if m["type"] == "websocket.send" and "text" in m]
    chunks = [h for h in headers if h["type"] == "chunk"]
    assert generated >= 12 and pending <= 3
    assert len(chunks) < generated / 2  # most were never sent: the socket was far too slow
    assert chunks and max(h["dropped_chunks"] for h in chunks) > 0
    assert not app.active


def test_outbox_drops_oldest_chunks_keeps_control_messages():
    async def run():
        box = Outbox(max_chunks=2)
        box.control({"type": "notice", "message": "a"})
        for i in range(5):
            box.chunk({"type": "chunk", "index": i}, [b"f1", b"f2"])
        box.control({"type": "error", "message": "b"})
        got = [await box.get() for _ in range(4)]
        return box, got

    box, got = asyncio.run(run())
    assert [json.loads(g[0])["type"] for g in got] == ["notice", "chunk", "chunk", "error"]
    assert [json.loads(g[0])["index"] for g in got[1:3]] == [3, 4] and got[1][1:] == [b"f1", b"f2"]
    assert json.loads(got[1][0])["dropped_chunks"] == 3 and box.dropped_frames == 6


def test_dataset_clip_start_puts_its_frames_and_camera_into_memory(world):
    with connect(world["ws"]) as ws:
        recv_json(ws, "hello")
        ws.send(json.dumps({"type": "start", "source": "gallery", "index": 0, "video": True}))
        started = recv_json(ws, "started")
        assert (started["kind"], started["history_latents"], started["camera"]) == ("video", 8, "the clip's camera")
        session = next(iter(world["app"].active.values()))
        # The clip walks forward (w-32 at 0.02 units per frame): its latents' actions say W, its poses moved on z.
        assert session.player.actions[:8].tolist() == [0] + [9] * 7
        assert session.player.poses[7, 2, 3].item() == pytest.approx(7 * 4 * 0.02, abs=1e-5)
        ws.send(json.dumps({"type": "keys", "held": ["s"], "seq": 1}))
        chunk = recv_json(ws, "chunk")
        assert chunk["context_latents"] == 8 and chunk["latents"] == 12
        ws.send(json.dumps({"type": "pause"}))
        ws.send(json.dumps({"type": "save"}))
        saved = recv_json(ws, "saved")

    # The download replays through python -m infer --video: the prefix's camera from the pose JSON, then the moves.
    dl = world["root"] / "dl_video"
    dl.mkdir()
    for key in ("pose", "start", "sidecar"):
        status, body, _ = http_get(world["url"], saved["files"][key])
        assert status == 200
        (dl / saved["files"][key].rsplit("/", 1)[1]).write_bytes(body)
    stem = f"take{saved['take']}"
    assert saved["replay"].endswith(f"--video {stem}_prefix.mp4 --pose {stem}_pose.json --seed 0 --out {stem}_replay.mp4")
    session_side = json.loads((dl / f"{stem}.json").read_text())
    out = dl / "replay.mp4"
    assert infer_main(["--bundle", str(world["bundle"]), "--video", str(dl / f"{stem}_prefix.mp4"), "--pose",
                       str(dl / f"{stem}_pose.json"), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    replay = json.loads(out.with_suffix(".json").read_text())
    ids = [lat["action_id"] for lat in session_side["latents"]]
    assert [lat["action_id"] for lat in replay["latents"]] == ids and ids[:8] == [0] + [9] * 7 and len(ids) >= 12
    assert replay["settings"]["start"] == {"kind": "video", "input_frames": 29, "frames": 29, "latents": 8, "camera": "poses"}
    torch.testing.assert_close(torch.tensor([lat["c2w"] for lat in replay["latents"]]),
                               torch.tensor([lat["c2w"] for lat in session_side["latents"]]), rtol=0, atol=1e-6)
    # A pose string continues after the video (whose camera is then taken as still).
    assert infer_main(["--bundle", str(world["bundle"]), "--video", str(dl / f"{stem}_prefix.mp4"), "--pose", "d-4",
                       "--out", str(dl / "more.mp4"), "--quiet", "--device", "cpu"]) == 0
    more = json.loads((dl / "more.json").read_text())
    assert [lat["action_id"] for lat in more["latents"]] == [0] * 8 + [27] * 4 and more["video"]["frames"] == 29 + 16
    assert infer_main(["--bundle", str(world["bundle"]), "--video", str(dl / f"{stem}_prefix.mp4"), "--pose", "d-3",
                       "--out", str(dl / "bad.mp4"), "--quiet"]) == 2 and not (dl / "bad.mp4").exists()


# --------------------------------------------------------------------------- the player's video start


def test_reset_video_history_encoding_cameras_and_errors(world):
    player = WorldPlayer.from_bundle(world["bundle"])
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, (35, 45, 80, 3), dtype=np.uint8)  # 35 frames = 9 latents -> last 29 frames (8)
    keys = parse_pose_string("w-20, left-14")  # per frame
    used = player.reset_video(video, keys=keys)
    assert used.shape == (29, H, W, 3) and player.num_latents == 8 and player.moves_needed == 4
    # The history holds the autoencoder's latents of exactly the last 29 frames, framed like an image.
    z = player.bundle.autoencoder.encode(to_video_tensor(used))
    torch.testing.assert_close(player.latents, z)
    from data.transforms import crop_box, crop_resize_frames

    torch.testing.assert_close(torch.from_numpy(used), torch.from_numpy(crop_resize_frames(video[6:], crop_box((45, 80), (H, W)), (H, W))))
    # Keys: frames 6..34 are W until frame 20, then left; latent keys by majority of each group, integrated.
    assert player.actions.tolist() == [0, 9, 9, 9, 0, 2, 2, 2]  # latent 4 (frames 19-22): 2 W + 2 left, no majority
    assert player.settings()["start"] == {"kind": "video", "input_frames": 35, "frames": 29, "latents": 8, "camera": "keys"}
    frames = player.step("d")
    assert frames.shape == (16, H, W, 3) and player.num_latents == 12
    assert player.rollout is not None and player._state.chunks[-1].context_idx.tolist() == [list(range(8))]

    # Known camera: per-frame poses (any world frame) and pixel K of the input frames.
    c2w = keys_to_poses(parse_pose_string("d-34"), MotionSteps(0.05, 1.0))
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = torch.tensor([5.0, -2.0, 1.0])
    K = make_intrinsics(60, 80, 45).double()
    player.reset_video(video, c2w=shift @ c2w, K=K, max_latents=6)  # at most 6 -> 4 latents (whole chunks)
    assert player.num_latents == 4
    want = invert_rigid(latent_poses(c2w[-13:], 4)[:1]) @ latent_poses(c2w[-13:], 4)
    torch.testing.assert_close(player.poses, want)
    assert player.actions.tolist() == [0, 27, 27, 27]
    crop_w = 68  # 80x45 cropped to 1.5:1 -> 68x45, then resized to 24x16
    Kn = normalize_intrinsics(K, 80, 45)
    assert player.intrinsics[0, 0, 0].item() == pytest.approx(Kn[0, 0].item() * 80 / crop_w, rel=1e-6)
    assert player.intrinsics[0, 0, 2].item() == pytest.approx(0.5, abs=1e-3)

    with pytest.raises(InferError, match="needs at least one chunk, 4 latents = 13 frames"):
        player.reset_video(video[:9])
    with pytest.raises(InferError, match="c2w or as keys, not both"):
        player.reset_video(video, c2w=c2w, keys=keys)
    with pytest.raises(InferError, match=r"keys must be per-frame held keys \[35, 8\]"):
        player.reset_video(video, keys=keys[:10])
    with pytest.raises(InferError, match="uint8 frames"):
        player.reset_video(video.astype(np.float32))


def test_framing_sentences():
    assert framing((16, 24), (16, 24)) == "resized from 24x16 to 24x16 (same aspect ratio, nothing cropped)"
    assert "cut at top and bottom" in framing((100, 60), (16, 24))
    with pytest.raises(InferError, match="keep only 7%"):
        framing((100, 10), (16, 24))
    up = decode_upload(png_bytes(30, 45), (16, 24), limit_bytes=10**6, max_frames=10)
    assert up.kind == "image" and up.frames.shape == (1, 30, 45, 3)
