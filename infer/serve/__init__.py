"""Play a world in the browser: ``python -m infer.serve --bundle B`` serves one page on 127.0.0.1.

Keys in (W A S D and the arrows, held keys combine, sampled once per chunk), frames out (JPEG over
a WebSocket, pushed as each chunk is decoded); start from a dataset frame, a dataset clip (its
first frames and camera become the history), or an uploaded image or video; reset; per-chunk
latency, frames/s and key-to-frame delay on screen; "download this session" (mp4 + WorldPlay pose
JSON + sidecar, replayable with ``python -m infer``). :mod:`infer.serve.app` has the routes and
protocol, :mod:`infer.serve.session` the per-connection player, :mod:`infer.serve.media` uploads.
"""

from infer.serve.app import ServeConfig, Server, run_in_thread

__all__ = ["ServeConfig", "Server", "run_in_thread"]
