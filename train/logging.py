"""Run logging on rank 0: progress bar (or plain lines), ``metrics.jsonl`` and Weights & Biases.

wandb is imported lazily and runs offline unless configured online; its run id is kept in
``<run>/wandb_run_id`` so a resumed run continues the same wandb run. On resume, ``metrics.jsonl``
drops the records past the resumed step (they are about to be recomputed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

from train.config import LoggerConfig

log = logging.getLogger("worldsmith.train")
WANDB_ID_FILE = "wandb_run_id"


def _ensure_handler() -> None:
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt_number(x: float) -> str:
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}"


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class RunLogger:
    """Everything the loop reports; inert on ranks other than 0."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, is_main: bool, total_steps: int, start_step: int, run_config: Optional[dict[str, Any]] = None):
        self.cfg, self.run_dir, self.active = cfg, Path(run_dir), is_main
        self.total_steps, self.start_step = total_steps, start_step
        self.bar: Any = None
        self.wandb_run: Any = None
        self._jsonl: Any = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if not self.active:
            return
        _ensure_handler()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            path = self.run_dir / "metrics.jsonl"
            truncate_jsonl(path, start_step)
            self._jsonl = open(path, "a")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self.wandb_run = self._init_wandb(run_config)
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def _init_wandb(self, run_config: Optional[dict[str, Any]]) -> Any:
        import wandb  # lazy: heavy, and optional

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        (self.run_dir / "wandb").mkdir(exist_ok=True)
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.cfg.wandb_name or self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=self.cfg.wandb_mode,
            config=run_config or {},
        )

    def step_done(self) -> None:
        """Advance the progress bar (host-only, no sync)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float], perf: bool = True) -> dict[str, float]:
        """Report ``metrics`` at ``step``; with ``perf``, adds it/s, tokens/s (if ``tokens`` given) and ETA."""
        if not self.active:
            return metrics
        if not perf:
            self._write(step, metrics)
            return metrics
        now = time.perf_counter()
        dt, dsteps = max(now - self._last_time, 1e-9), step - self._last_step
        self._last_time, self._last_step = now, step
        metrics = dict(metrics)
        it_s = dsteps / dt
        metrics["perf/it_per_s"] = it_s
        tokens = metrics.pop("tokens", None)
        if tokens:
            metrics["perf/tokens_per_s"] = tokens / dt
        eta = (self.total_steps - step) / it_s if it_s > 0 else float("inf")
        self._write(step, metrics)
        brief = {k.split("/", 1)[-1]: v for k, v in metrics.items() if k.startswith("loss/")}
        if "perf/tokens_per_s" in metrics:
            brief["tok/s"] = metrics["perf/tokens_per_s"]
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt_number(v) for k, v in brief.items()}, refresh=False)
        else:
            parts = [f"step {step}/{self.total_steps}"] + [f"{k} {_fmt_number(v)}" for k, v in brief.items()]
            parts += [f"{it_s:.2f} it/s", f"eta {_fmt_duration(eta)}"]
            log.info(" | ".join(parts))
        return metrics

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self._jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def info(self, message: str) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.write(message)
            else:
                log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
