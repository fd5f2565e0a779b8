"""One connection's play session: its own :class:`~infer.player.WorldPlayer`, the generation loop,
the outgoing queue and the recording that "download this session" writes.

Three tasks per connection share a session (see :mod:`infer.serve.app`): the reader applies the
page's messages (keys, start, pause, save), the generator steps the player one chunk at a time
with the keys held *when the chunk starts* (keys are sampled per chunk), and the sender drains the
:class:`Outbox` to the socket. Generation never waits for the socket: the outbox keeps at most a
few chunks of frames and drops the oldest when a client falls behind (the recording keeps every
frame, and the page is told how many chunks it missed). Player calls run on the server's single
generation thread, under the session's lock, so a step, a reset and a save never overlap.

Pacing: with ``pace`` on, the next chunk starts when the frames already sent would finish playing
at the video's frame rate, less the last chunk's latency, so keys are sampled as late as possible
(the shortest key-to-frame delay) without starving the page; slower-than-real-time generation runs
back to back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import zipfile
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import cv2
import numpy as np

from data.geometry import resize_intrinsics
from data.poseio import MOVE_KEYS, write_pose_json
from infer.errors import InferError
from infer.player import WorldPlayer
from infer.serve.media import Upload, encode_frames
from infer.sidecar import build_sidecar, write_outputs

if TYPE_CHECKING:  # pragma: no cover
    from infer.serve.app import Server

__all__ = ["Outbox", "PlaySession", "KEY_NAMES", "move_of"]

log = logging.getLogger("infer.serve")
KEY_NAMES = tuple(MOVE_KEYS)  # w s d a right left up down: the pose-string names the page sends
Message = Union[str, bytes]


def move_of(held: tuple[str, ...]) -> Optional[str]:
    """The player's move for a set of held keys ("w+left"), None when nothing is held."""
    return "+".join(held) if held else None


class Outbox:
    """Messages for one client: control messages are always kept, chunks of frames are dropped
    oldest-first beyond ``max_chunks`` pending (a slow client never holds back generation)."""

    def __init__(self, max_chunks: int = 3):
        if max_chunks < 1:
            raise ValueError(f"Outbox.max_chunks must be >= 1, got {max_chunks}")
        self.max_chunks = max_chunks
        self.items: deque[tuple[str, Any, list[Message]]] = deque()  # (kind, header, messages)
        self.dropped_chunks = 0
        self.dropped_frames = 0
        self._ready = asyncio.Event()

    def control(self, message: dict[str, Any]) -> None:
        self.items.append(("control", message, []))
        self._ready.set()

    def chunk(self, header: dict[str, Any], frames: list[bytes]) -> None:
        pending = [i for i, item in enumerate(self.items) if item[0] == "chunk"]
        while len(pending) >= self.max_chunks:
            old = self.items[pending.pop(0)]
            self.items.remove(old)
            pending = [i for i, item in enumerate(self.items) if item[0] == "chunk"]
            self.dropped_chunks += 1
            self.dropped_frames += len(old[2])
        self.items.append(("chunk", header, list(frames)))
        self._ready.set()

    async def get(self) -> list[Message]:
        """The next item's messages (a JSON text, then its binary frames), waiting for one."""
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        kind, header, frames = self.items.popleft()
        if kind == "chunk":
            header = {**header, "dropped_chunks": self.dropped_chunks, "dropped_frames": self.dropped_frames}
        return [json.dumps(header)] + frames


@dataclass
class Take:
    """What one start (or reset) produced so far: the recording behind "download this session"."""

    number: int
    kind: str  # "image" | "video"
    source: dict[str, Any]  # what the page chose (gallery index / upload) and how it was framed
    start_file: str  # file in the session directory: the start image, or the video prefix (written at save)
    prefix: Optional[np.ndarray]  # video start: the frames used, as the model saw them
    frames: list[np.ndarray]
    chunks: list[dict[str, Any]]


class PlaySession:
    """A connection's player and recording; the server creates one per accepted WebSocket."""

    def __init__(self, server: "Server", token: str, directory: Path):
        self.server = server
        self.cfg = server.cfg
        self.token = token
        self.dir = directory
        self.player = WorldPlayer(server.bundle, server.player_cfg, settings=server.settings)
        self.outbox = Outbox(self.cfg.send_queue_chunks)
        self.lock = asyncio.Lock()
        self.playing = asyncio.Event()
        self.held: tuple[str, ...] = ()
        self.seq = 0
        self.take: Optional[Take] = None
        self.upload: Optional[Upload] = None
        self.pending_upload: Optional[dict[str, Any]] = None
        self.next_due = 0.0
        self.saved: dict[str, str] = {}
        self.last_start: Optional[tuple[Any, Any, bool]] = None  # (source, index, as_video) of the take

    # ------------------------------------------------------------------ helpers
    async def _run(self, fn: Callable[[], Any]) -> Any:
        """Run a player call on the server's generation thread."""
        executor: Executor = self.server.executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    def error(self, where: str, message: str) -> None:
        self.outbox.control({"type": "error", "where": where, "message": message})

    def notice(self, message: str) -> None:
        self.outbox.control({"type": "notice", "message": message})

    # ------------------------------------------------------------------ page messages
    def set_keys(self, held: Any, seq: Any) -> None:
        """The keys the page holds now (names from KEY_NAMES); unknown names are refused with a message."""
        if not isinstance(held, list) or not all(isinstance(k, str) for k in held):
            self.error("keys", f"'held' must be a list of key names, got {held!r}")
            return
        unknown = sorted({k for k in held if k not in KEY_NAMES})
        if unknown:
            self.error("keys", f"unknown keys {unknown}; the keys are {list(KEY_NAMES)} (W A S D and the arrows)")
            return
        self.held = tuple(k for k in KEY_NAMES if k in held)  # canonical order, duplicates gone
        self.seq = int(seq) if isinstance(seq, (int, float)) and math.isfinite(seq) else self.seq + 1

    async def start(self, source: str, index: Any = None, as_video: bool = False) -> None:
        """Begin a new take from a gallery item (its first frame, or its first frames with their camera)
        or from the last upload; resets the player and the recording."""
        cfg, player = self.cfg, self.player
        if source == "gallery":
            gallery = self.server.gallery
            if not isinstance(index, int) or not 0 <= index < len(gallery):
                self.error("start", f"no start image {index!r}: the gallery has {len(gallery)} (0..{len(gallery) - 1})")
                return
            item = gallery[index]
            described = {"source": "gallery", "index": index, "label": item.label}
            if as_video and item.video is not None and item.video.shape[0] > 1:
                video, c2w, K, camera = item.video, item.c2w, item.K, "the clip's camera"
            else:
                video, c2w, K, camera = item.image[None], None, None, None
        elif source == "upload":
            if self.upload is None:
                self.error("start", "nothing uploaded yet: choose an image or a video file first")
                return
            video, c2w, K = self.upload.frames, None, None
            camera = "unknown, taken as still" if self.upload.kind == "video" else None
            described = {"source": "upload", "kind": self.upload.kind, "framing": self.upload.note}
        else:
            self.error("start", f"unknown start source {source!r}; use 'gallery' or 'upload'")
            return

        def reset() -> np.ndarray:
            if video.shape[0] == 1:
                return player.reset(video[0], cfg.prompt, seed=cfg.seed)[None]
            return player.reset_video(video, cfg.prompt, c2w=c2w, K=K, max_latents=cfg.video_latents, seed=cfg.seed)

        self.playing.clear()
        async with self.lock:
            try:
                used = await self._run(reset)
            except InferError as e:
                self.take = None
                self.error("start", str(e))
                return
            kind = "video" if video.shape[0] > 1 else "image"
            number = (self.take.number + 1) if self.take else 1
            stem = f"take{number}"
            start_file = f"{stem}_start.png" if kind == "image" else f"{stem}_prefix.mp4"
            if kind == "image":
                cv2.imwrite(str(self.dir / start_file), np.ascontiguousarray(used[0][..., ::-1]))
            if camera:
                described["camera"] = camera
            self.take = Take(number, kind, described, start_file, used if kind == "video" else None,
                             [used] if kind == "video" else [], [])
        preview = encode_frames(used[-1:], cfg.frame_format, cfg.quality)
        note = described.get("framing")
        self.outbox.control({
            "type": "started", "take": number, "kind": kind, "framing": note,
            "history_latents": player.num_latents, "camera": camera,
            "message": (f"started from {described.get('label', 'your upload')}"
                        + (f" ({used.shape[0]} frames, {player.num_latents} latents of history)" if kind == "video" else "")
                        + (f"; {note}" if note else "")),
        })
        self.outbox.items[-1][2].extend(preview)  # the first frame (or the video's last), shown before the first chunk
        self.next_due = 0.0
        self.playing.set()

    def accept_upload_header(self, name: Any, size: Any) -> None:
        """Announce an upload; the next binary message holds its bytes. Oversized uploads are refused here."""
        limit = self.cfg.upload_limit_bytes
        if not isinstance(size, int) or size < 0:
            self.error("upload", f"the upload header needs its size in bytes, got {size!r}")
            return
        if size > limit:
            self.error("upload", f"{str(name)[:80]!r} is {size / 2**20:.2f} MiB; the upload limit is {limit / 2**20:.2f} MiB")
            return
        self.pending_upload = {"name": str(name)[:200], "size": size}

    async def receive_upload(self, data: bytes) -> None:
        """Decode the bytes announced by the last upload header (never written under the name it gives)."""
        from infer.serve.media import decode_upload

        header, self.pending_upload = self.pending_upload, None
        if header is None:
            self.error("upload", "unexpected binary message: send an upload header ({'type': 'upload', 'name', 'size'}) first")
            return
        if len(data) != header["size"]:
            self.error("upload", f"the upload announced {header['size']} bytes and sent {len(data)}")
            return
        hw = (self.player.height, self.player.width)
        try:
            upload = await asyncio.get_running_loop().run_in_executor(
                None, lambda: decode_upload(data, hw, limit_bytes=self.cfg.upload_limit_bytes,
                                            max_frames=self.cfg.max_upload_frames, name=repr(header["name"][:80])))
        except InferError as e:
            self.error("upload", str(e))
            return
        self.upload = upload
        self.outbox.control({"type": "uploaded", "kind": upload.kind, "frames": int(upload.frames.shape[0]),
                             "framing": upload.note})

    def pause(self) -> None:
        self.playing.clear()

    def resume(self) -> None:
        if self.take is None:
            self.error("resume", "choose a start image first")
            return
        self.playing.set()

    # ------------------------------------------------------------------ generation
    async def generate(self) -> None:
        """Step the player one chunk at a time while playing; runs until cancelled."""
        cfg, player = self.cfg, self.player
        while True:
            await self.playing.wait()
            delay = self.next_due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.05))  # short naps: a pause or a reset is seen quickly
                continue
            async with self.lock:
                take = self.take
                if not self.playing.is_set() or take is None:
                    continue
                recorded = sum(f.shape[0] for f in take.frames)
                if recorded >= cfg.max_session_frames:
                    self.playing.clear()
                    self.notice(f"this take reached the session limit of {cfg.max_session_frames} frames: "
                                "download it, or reset to start again")
                    continue
                held, seq = self.held, self.seq
                try:
                    frames, encoded = await self._run(lambda: self._step(held))
                except Exception as e:  # a failed step must reach the page, not kill the stream
                    self.playing.clear()
                    kind = "" if isinstance(e, InferError) else f"{type(e).__name__}: "
                    if not isinstance(e, InferError):
                        log.exception("step failed in session %s", self.token[:8])
                    self.error("step", f"generation stopped: {kind}{e}. Reset or choose a start image to go on")
                    continue
                t = player.chunk_timings[-1]
                take.frames.append(frames)
                new = player.actions[-t.num_latents:].tolist()
                c2w = player.poses[-1]
                fwd = c2w[:3, 2]
                header = {
                    "type": "chunk", "take": take.number, "index": t.index, "frames": len(encoded), "seq": seq,
                    "keys": list(held), "action_ids": new, "latents": player.num_latents,
                    "latency_s": t.total_s, "model_s": t.model_s, "decode_s": t.decode_s,
                    "context_latents": t.context_latents,
                    "pose": {"x": float(c2w[0, 3]), "y": float(c2w[1, 3]), "z": float(c2w[2, 3]),
                             "yaw_deg": math.degrees(math.atan2(float(fwd[0]), float(fwd[2])))},
                }
                take.chunks.append({k: header[k] for k in ("index", "seq", "keys", "action_ids", "latency_s")})
                self.outbox.chunk(header, encoded)
            now = time.monotonic()
            self.next_due = now + (len(encoded) / player.fps - t.total_s if cfg.pace else 0.0)

    def _step(self, held: tuple[str, ...]) -> tuple[np.ndarray, list[bytes]]:
        frames = self.player.step(move_of(held))
        return frames, encode_frames(frames, self.cfg.frame_format, self.cfg.quality)

    # ------------------------------------------------------------------ download
    async def save(self) -> None:
        """Write the take's mp4, sidecar, WorldPlay pose JSON and start file (and a zip of them) into the
        session directory, and send their download addresses."""
        async with self.lock:
            take = self.take
            if take is None or not take.chunks:
                self.error("save", "nothing to download yet: choose a start image and play a little first")
                return
            try:
                files = await self._run(lambda: self._write(take))
            except (InferError, OSError, ValueError) as e:
                self.error("save", f"could not write the session: {e}")
                return
        command = files.pop("replay_command")
        self.saved = {k: f"/session/{self.token}/{v}" for k, v in files.items()}
        self.outbox.control({"type": "saved", "take": take.number, "files": self.saved, "replay": command})

    def replay_command(self, take: Take) -> str:
        """The ``python -m infer`` call that replays the take from the downloaded files."""
        stem, bundle = f"take{take.number}", self.server.bundle_path
        start = f"--image {take.start_file}" if take.kind == "image" else f"--video {take.start_file}"
        return (f"python -m infer --bundle {bundle} {start} --pose {stem}_pose.json --seed {self.cfg.seed} "
                f"--out {stem}_replay.mp4")

    def _write(self, take: Take) -> dict[str, str]:
        player, stem, d = self.player, f"take{take.number}", self.dir
        frames = np.concatenate(take.frames)
        if frames.shape[0] != player.num_frames:
            raise InferError(f"internal: recorded {frames.shape[0]} frames for {player.num_frames} expected")
        mp4 = d / f"{stem}.mp4"
        command = self.replay_command(take)
        sidecar = build_sidecar(player, out=mp4, image=take.start_file if take.kind == "image" else None)
        sidecar["inputs"].update(pose=f"{stem}_pose.json", pose_source="json",
                                 video=take.start_file if take.kind == "video" else None)
        sidecar["serve"] = {"take": take.number, "start": take.source, "chunks": take.chunks,
                            "dropped_chunks": self.outbox.dropped_chunks, "replay": command}
        write_outputs(mp4, frames, player.fps, sidecar)
        K_pix = resize_intrinsics(player.intrinsics, (1, 1), (player.height, player.width))  # normalised -> pixels
        write_pose_json(d / f"{stem}_pose.json", player.poses, K_pix)
        if take.kind == "video":
            from data.video import write_mp4

            write_mp4(d / take.start_file, take.prefix, fps=player.fps)
        names = [mp4.name, f"{stem}.json", f"{stem}_pose.json", take.start_file]
        tmp = d / f".{stem}.zip.tmp"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for name in names:
                z.write(d / name, arcname=f"{stem}/{name}")
            z.writestr(f"{stem}/REPLAY.txt", f"From this folder:\n\n    {command}\n")
        tmp.replace(d / f"{stem}.zip")
        return {"zip": f"{stem}.zip", "mp4": mp4.name, "sidecar": f"{stem}.json", "pose": f"{stem}_pose.json",
                "start": take.start_file, "replay_command": command}
