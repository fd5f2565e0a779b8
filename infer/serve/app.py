"""The play server: one ASGI application (run by uvicorn) with one page, a WebSocket per player and
the session downloads.

Routes (nothing else is served; every file name is looked up in a fixed table or matched against a
fixed pattern, so no request path ever reaches the file system as given):

=================================  ==============================================================
``GET /``                          the page (``static/index.html``, ``app.js``, ``style.css``)
``GET /api/info``                  bundle, video size and rate, keys, gallery, limits (JSON)
``GET /api/gallery/<i>.jpg``       start-gallery thumbnail ``i``
``GET /session/<token>/<file>``    a session's downloads (``take<N>.zip``, ``.mp4``, ``.json``, ...)
``WS  /ws``                        one player: JSON messages both ways, frames as binary messages
=================================  ==============================================================

WebSocket protocol. Page -> server (JSON): ``{"type": "keys", "held": ["w", "left"], "seq": n}``
(the held keys, sent on every change; ``seq`` numbers the changes), ``start`` (``source``:
``gallery`` with ``index`` and ``video`` true/false, or ``upload``), ``upload`` (``name``,
``size``; the next binary message holds the bytes), ``pause``, ``resume``, ``reset`` (the same
start again), ``save``. Server -> page: ``hello``, ``busy`` (every player slot taken; then the
socket closes with 1013), ``started`` (+ one preview frame), ``chunk`` (+ its frames as JPEG/WebP
binary messages; ``seq`` says which key state it was generated with), ``uploaded``, ``saved``
(download addresses), ``notice`` and ``error`` (``where`` + ``message``).

The bundle is loaded once; each connection gets its own :class:`~infer.player.WorldPlayer` over
the shared weights, up to ``max_players`` at a time. All player calls run on one generation
thread (the device runs one chunk at a time anyway). Connections from another origin are refused
(a web page elsewhere must not drive a local model through the user's browser).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from infer.config import PlayerConfig
from infer.errors import InferError
from infer.player import WorldPlayer
from infer.serve.media import StartItem, load_gallery
from infer.serve.session import KEY_NAMES, PlaySession

__all__ = ["ServeConfig", "Server", "run_in_thread", "STATIC_FILES"]

log = logging.getLogger("infer.serve")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SESSION_FILE = re.compile(r"^take\d{1,5}(\.mp4|\.json|_pose\.json|_start\.png|_prefix\.mp4|\.zip)$")
TOKEN = re.compile(r"^[0-9a-f]{32}$")
CONTENT_TYPES = {".mp4": "video/mp4", ".json": "application/json", ".png": "image/png", ".zip": "application/zip"}
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ServeConfig:
    """What the server allows and how it streams (``python -m infer.serve --help`` documents each)."""

    bundle: str
    out: str = "outputs/serve"
    max_players: int = 1
    upload_limit_mb: float = 16.0
    max_upload_frames: int = 600
    max_session_frames: int = 4800
    frame_format: str = "jpeg"
    quality: int = 90
    pace: bool = True
    send_queue_chunks: int = 3
    video_latents: int = 16
    prompt: Optional[str] = None
    seed: int = 0
    data: Optional[str] = None
    images: Optional[str] = None
    gallery: int = 12
    keep_sessions: int = 64

    def __post_init__(self) -> None:
        if self.max_players < 1:
            raise InferError(f"--max-players must be >= 1, got {self.max_players}")
        if not 0 < self.upload_limit_mb <= 1024:
            raise InferError(f"--upload-limit-mb must lie in (0, 1024], got {self.upload_limit_mb}")
        if self.frame_format not in ("jpeg", "webp"):
            raise InferError(f"--format must be jpeg or webp, got {self.frame_format!r}")
        if not 1 <= self.quality <= 100:
            raise InferError(f"--quality must lie in 1..100, got {self.quality}")
        for name in ("max_upload_frames", "max_session_frames", "send_queue_chunks", "video_latents"):
            if getattr(self, name) < 1:
                raise InferError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def upload_limit_bytes(self) -> int:
        return int(self.upload_limit_mb * 2**20)


class Server:
    """The ASGI application: ``uvicorn.run(Server(cfg, player_cfg), ...)``; see the module docstring."""

    def __init__(self, cfg: ServeConfig, player_cfg: Optional[PlayerConfig] = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        template = WorldPlayer.from_bundle(cfg.bundle, player_cfg)  # the one load of the weights
        self.bundle, self.player_cfg = template.bundle, template.cfg
        self.settings = (template.rollout_cfg, template.video)
        self.bundle_path = str(cfg.bundle)
        self.unit, self.stride = template.unit, template.temporal_stride
        self.height, self.width, self.fps = template.height, template.width, template.fps
        self.load_seconds = template.load_seconds
        data = cfg.data
        if data is None:  # the bundle's own training data, when it is on this machine
            recorded = (self.bundle.meta.get("data") or {}).get("path") if isinstance(self.bundle.meta.get("data"), dict) else None
            data = recorded if recorded and (Path(recorded) / "index.json").is_file() else None
        clip_frames = 1 + self.stride * (max(1, cfg.video_latents) - 1)
        self.gallery: list[StartItem] = load_gallery((self.height, self.width), data=data, images=cfg.images,
                                                     count=cfg.gallery, clip_frames=clip_frames)
        self.data = data
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.active: dict[str, PlaySession] = {}
        self.sessions: OrderedDict[str, Path] = OrderedDict()  # token -> directory, for downloads after a disconnect

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "websocket":
            if scope["path"] != "/ws":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ HTTP
    def info(self) -> dict[str, Any]:
        meta = self.bundle.meta
        return {
            "bundle": {"path": self.bundle_path, "stage": meta.get("stage"), "step": meta.get("step")},
            "height": self.height, "width": self.width, "fps": self.fps, "chunk_latents": self.unit,
            "frames_per_chunk": self.unit * self.stride, "device": str(self.player_cfg.device),
            "keys": list(KEY_NAMES), "frame_format": self.cfg.frame_format, "prompt": self.cfg.prompt,
            "upload_limit_bytes": self.cfg.upload_limit_bytes, "max_players": self.cfg.max_players,
            "active_players": len(self.active), "video_latents": self.cfg.video_latents, "pace": self.cfg.pace,
            "gallery": [{"index": i, "label": g.label, "clip": g.video is not None and g.video.shape[0] > 1,
                         "url": f"/api/gallery/{i}.jpg"} for i, g in enumerate(self.gallery)],
            "data": self.data,
        }

    async def _http(self, scope: Scope, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain; charset=utf-8", [(b"allow", b"GET, HEAD")])
            return
        if path in STATIC_FILES:
            name, ctype = STATIC_FILES[path]
            await _respond(send, 200, (STATIC_DIR / name).read_bytes(), ctype)
        elif path == "/api/info":
            await _respond(send, 200, json.dumps(self.info()).encode(), "application/json")
        elif (m := re.fullmatch(r"/api/gallery/(\d{1,4})\.jpg", path)) and int(m.group(1)) < len(self.gallery):
            await _respond(send, 200, self.gallery[int(m.group(1))].thumbnail, "image/jpeg")
        elif path.startswith("/session/"):
            await self._download(path, send)
        else:
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8")

    async def _download(self, path: str, send: Send) -> None:
        parts = path.split("/")
        ok = len(parts) == 4 and TOKEN.match(parts[2]) and SESSION_FILE.match(parts[3]) and parts[2] in self.sessions
        file = (self.sessions[parts[2]] / parts[3]) if ok else None
        if file is None or not file.is_file() or file.resolve().parent != self.sessions[parts[2]].resolve():
            await _respond(send, 404, b"no such session file\n", "text/plain; charset=utf-8")
            return
        ctype = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        disposition = f'attachment; filename="{file.name}"'.encode()
        await _respond(send, 200, file.read_bytes(), ctype, [(b"content-disposition", disposition)])

    # ------------------------------------------------------------------ WebSocket
    def _same_origin(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if origin is None:
            return True  # not a browser (a script, a test client)
        host = headers.get(b"host", b"").decode("latin-1")
        return origin.decode("latin-1").split("://", 1)[-1] == host

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if not self._same_origin(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        if len(self.active) >= self.cfg.max_players:
            n = self.cfg.max_players
            await send({"type": "websocket.send", "text": json.dumps({
                "type": "busy", "message": f"all {n} player slot{'s' if n > 1 else ''} of this server "
                                           f"{'are' if n > 1 else 'is'} in use; try again when a player leaves "
                                           f"(or start the server with --max-players {n + 1})"})})
            await send({"type": "websocket.close", "code": 1013, "reason": "busy"})
            return
        token = secrets.token_hex(16)
        directory = self.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{token[:8]}"
        directory.mkdir(parents=True)
        session = PlaySession(self, token, directory)
        self.active[token] = session
        self.sessions[token] = directory
        while len(self.sessions) > self.cfg.keep_sessions:
            old = next(iter(self.sessions))
            if old in self.active:
                break
            self.sessions.popitem(last=False)
        session.outbox.control({"type": "hello", "session": token, **self.info()})
        sender = asyncio.create_task(self._sender(session, send))
        generator = asyncio.create_task(session.generate())
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    await session.receive_upload(message["bytes"])
                elif message.get("text") is not None:
                    await self._dispatch(session, message["text"])
        finally:
            for task in (generator, sender):
                task.cancel()
            await asyncio.gather(generator, sender, return_exceptions=True)
            session.playing.clear()
            self.active.pop(token, None)

    @staticmethod
    async def _sender(session: PlaySession, send: Send) -> None:
        while True:
            for m in await session.outbox.get():
                await send({"type": "websocket.send", "text": m} if isinstance(m, str) else {"type": "websocket.send", "bytes": m})

    async def _dispatch(self, session: PlaySession, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            session.error("message", "not a JSON message")
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "keys":
            session.set_keys(msg.get("held"), msg.get("seq"))
        elif kind == "start":
            session.last_start = (msg.get("source"), msg.get("index"), bool(msg.get("video")))
            await session.start(*session.last_start)
        elif kind == "reset":
            if session.last_start is None:
                session.error("reset", "nothing to reset: choose a start image first")
            else:
                await session.start(*session.last_start)
        elif kind == "upload":
            session.accept_upload_header(msg.get("name"), msg.get("size"))
        elif kind == "pause":
            session.pause()
        elif kind == "resume":
            session.resume()
        elif kind == "save":
            await session.save()
        else:
            session.error("message", f"unknown message type {kind!r}; known: keys, start, reset, upload, pause, resume, save")


async def _respond(send: Send, status: int, body: bytes, content_type: str,
                   extra: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def uvicorn_config(app: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """The uvicorn settings of the play server (WebSocket frames up to the upload limit, no compression)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, ws="websockets-sansio", ws_per_message_deflate=False,
                          ws_max_size=app.cfg.upload_limit_bytes + 64 * 1024, lifespan="on", log_level=log_level,
                          access_log=False)


def run_in_thread(app: Server, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve ``app`` from a background thread; returns (uvicorn server, thread, base URL). ``port=0`` picks a free port.

    Stop it with ``server.should_exit = True; thread.join()``.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port))
    thread = threading.Thread(target=server.run, name="infer.serve", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the play server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return server, thread, f"http://{host}:{bound[1]}"
