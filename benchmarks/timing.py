"""Timing and reporting for the GPU benchmarks: CUDA events after warm-up, medians, peak memory, results files.

Every benchmark times its work with :class:`EventTimer`: CUDA events recorded around each
repetition (and at named marks inside it), read after one synchronisation at the end, so the timed
loop itself never waits on the host. On CPU the same API reads ``perf_counter`` (CPU work is
synchronous). Callers summarise with :func:`infer.timing.summarize` (median, p90, ...).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["EventTimer", "time_calls", "reset_peak_memory", "peak_memory_gib", "with_oom_retry", "environment", "Report"]


class EventTimer:
    """Times repetitions, and named segments inside each, with CUDA events (``perf_counter`` on CPU).

    ``begin()`` opens a repetition, ``mark(name)`` closes the segment that ends now and names it
    (segments of one name in one repetition add up), ``end()`` closes the repetition; time after the
    last mark goes to ``rest_name``. Nothing synchronises until :meth:`results`.
    """

    def __init__(self, device: torch.device | str, rest_name: str = "rest"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rest_name = rest_name
        self._reps: list[list[tuple[str, Any]]] = []
        self._open: list[tuple[str, Any]] | None = None

    def _stamp(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def begin(self) -> None:
        if self._open is not None:
            raise RuntimeError("EventTimer.begin: the previous repetition was not ended")
        self._open = [("", self._stamp())]

    def mark(self, name: str) -> None:
        if self._open is None:
            raise RuntimeError(f"EventTimer.mark({name!r}) outside a repetition (call begin() first)")
        self._open.append((name, self._stamp()))

    def end(self) -> None:
        if self._open is None:
            raise RuntimeError("EventTimer.end: no repetition is open")
        self._open.append(("", self._stamp()))
        self._reps.append(self._open)
        self._open = None

    def once(self, fn: Callable[["EventTimer"], Any]) -> Any:
        """Run ``fn(self)`` as one repetition (for a profiled or extra run of a timed function)."""
        self.begin()
        out = fn(self)
        self.end()
        return out

    def discard(self) -> None:
        """Forget every repetition so far (e.g. the warm-up)."""
        self._reps.clear()
        self._open = None

    def _elapsed(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def results(self) -> tuple[list[float], dict[str, list[float]]]:
        """(total seconds per repetition, {segment name: seconds per repetition}); synchronises once."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        totals: list[float] = []
        segments: dict[str, list[float]] = defaultdict(list)
        for rep in self._reps:
            totals.append(self._elapsed(rep[0][1], rep[-1][1]))
            sums: dict[str, float] = defaultdict(float)
            for (_, t0), (name, t1) in zip(rep[:-1], rep[1:]):
                sums[name or self.rest_name] += self._elapsed(t0, t1)
            for name, s in sums.items():
                if name != self.rest_name or s > 0:
                    segments[name].append(s)
        return totals, dict(segments)


def time_calls(fn: Callable[[EventTimer], Any], *, warmup: int, reps: int, device: torch.device | str,
               rest_name: str = "rest", after_warmup: Callable[[], None] | None = None,
               ) -> tuple[list[float], dict[str, list[float]]]:
    """Run ``fn(timer)`` ``warmup`` times untimed, then ``reps`` times timed; ``fn`` may call ``timer.mark``.

    ``after_warmup()`` runs between the two (e.g. to save what is known if the timed part is cut short).
    Returns (seconds per repetition, {segment: seconds per repetition}) as :meth:`EventTimer.results`.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"time_calls: need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    timer = EventTimer(device, rest_name)
    for _ in range(warmup):
        timer.begin()
        fn(timer)
        timer.end()
    timer.discard()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    if after_warmup is not None:
        after_warmup()
    for _ in range(reps):
        timer.begin()
        fn(timer)
        timer.end()
    return timer.results()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window (CUDA; CPU peaks are process-wide)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float:
    """Peak allocated memory since :func:`reset_peak_memory` (CUDA) or the process's peak RSS (CPU), in GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def with_oom_retry(run: Callable[[bool], dict[str, Any]], *, ckpt: bool, retry: bool, device: torch.device | str,
                   on_oom: Callable[[bool, str], None]) -> dict[str, Any] | None:
    """``run(ckpt)`` -> a result row; on CUDA out-of-memory call ``on_oom(ckpt, message)`` and, if ``retry``
    and not yet checkpointed, run again with activation checkpointing (the row then says so in "note").

    Memory is released between attempts (the failed attempt's tensors live in its traceback until then).
    """
    first = ckpt
    while True:
        row, message = None, ""
        try:
            row = run(ckpt)
        except torch.OutOfMemoryError as e:
            message = str(e).split("\n")[0][:160]
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if row is not None:
            if ckpt and not first:
                row["note"] = "checkpointed after OOM"
            return row
        on_oom(ckpt, message)
        if ckpt or not retry:
            return None
        ckpt = True


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, software versions and host facts that every results file records."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


class Report:
    """Rows of one benchmark, rewritten to ``<out>.json`` and ``<out>.md`` after every row.

    A run cut short (time limit, crash) keeps the rows it finished. ``columns`` are
    (row key, header, format spec) for the markdown table; the JSON holds every key of every row.
    """

    def __init__(self, out: str | Path | None, title: str, command: str, env: dict[str, Any], settings: dict[str, Any],
                 columns: Sequence[tuple[str, str, str]]):
        self.out = Path(out) if out else None
        self.title, self.command, self.env, self.settings = title, command, env, settings
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.sections: list[str] = []  # free markdown after the table (e.g. kernel profiles)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(self._line(row), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)
        self.write()

    def section(self, markdown: str) -> None:
        """Append a markdown block after the table (printed too)."""
        self.sections.append(markdown)
        print(markdown, flush=True)
        self.write()

    def header(self) -> str:
        h = "| " + " | ".join(c[1] for c in self.columns) + " |"
        return h + "\n|" + "|".join("---" for _ in self.columns) + "|"

    def _line(self, row: dict[str, Any]) -> str:
        return "| " + " | ".join(_fmt(row.get(k), spec) for k, _, spec in self.columns) + " |"

    def markdown(self) -> str:
        env = ", ".join(f"{k} {v}" for k, v in self.env.items() if v is not None)
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines = [f"## {self.title}", "", f"`{self.command}`", "", env, "", settings, "", self.header()]
        lines += [self._line(r) for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        for block in self.sections:
            lines += ["", block]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"title": self.title, "command": self.command, "env": self.env, "settings": self.settings,
                "rows": self.rows, "notes": self.notes, "sections": self.sections}
        self.out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        self.out.with_suffix(".md").write_text(self.markdown())
