"""How runs are named, identified, found again for ``checkpoint.resume``, and compared in a sweep.

**Names.** ``python -m train experiment=NAME [overrides]`` runs in
``<out_root>/<name>/<YYYYmmdd-HHMMSS>_<slug>_<id>``: ``slug`` is a short, file-system-safe reading of
the overrides (``lr-0.0003_steps-200``: each key's last part and its value, a path value by its
last component, in command-line order, at most :data:`SLUG_CHARS` characters), ``id`` an 8-hex hash of all the
overrides (sorted; the keys in ``hydra.job.config.override_dirname.exclude_keys`` left out). A run
without overrides is ``<time>_<id>``. Names never hold ``=``, ``,``, ``/`` or spaces, so a run
directory can be passed back as an override value. The full overrides are in ``run.json`` and in
the header of the resolved ``config.yaml``. A sweep point is ``<sweep dir>/<num>_<slug>``, its slug
made of the swept keys only (``0_lr-0.001``, ``1_lr-0.002``).

**Identity and resume.** The *id* is what makes two commands "the same run": ``checkpoint.resume=
latest`` (``python -m train`` only; never part of the id) continues the newest run directory of
``<out_root>/<name>/`` whose name ends in the command's id, from its latest checkpoint, and fails
naming where it looked when there is none. ``checkpoint.resume=<run dir>`` continues that run;
``checkpoint.resume=<checkpoint dir>`` starts a new run directory from that checkpoint's state.
With an explicit run directory (``hydra.run.dir=DIR``, ``train.run.run(cfg, DIR)``, a SLURM job,
a sweep point), ``latest`` means that directory's latest checkpoint, or a fresh start when it has
none yet.

**Sweep summary.** :func:`write_summary` (run at the end of every ``python -m train -m`` by the
:class:`SweepSummary` callback, or by hand: ``python -m train.runs DIR``) writes ``summary.md`` and
``summary.json`` into a sweep directory (or any directory of runs): one row per run with its
overrides, status, step, final training loss and the last evaluation metrics it logged.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hydra.experimental.callback import Callback

SLUG_CHARS = 40  # readable part of a run directory name
VALUE_CHARS = 16  # longer values (lists, long strings) show only their key
RUN_INFO = "run.json"
_TIME_RE = r"\d{8}-\d{6}"
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


class RunNotFoundError(FileNotFoundError):
    """``checkpoint.resume`` names no run that exists; the message says where it looked."""


# ------------------------------------------------------------------------------------------------
# Names and identity
# ------------------------------------------------------------------------------------------------


def _split(override: str) -> tuple[str, str]:
    """(key without +/~ prefixes or @package, value) of a ``key=value`` override."""
    key, _, value = str(override).partition("=")
    return key.lstrip("+~").split("@")[0].strip(), value.strip()


def kept_overrides(overrides: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The overrides that define a run: sorted, without the excluded keys (experiment, resume, ...)."""
    skip = set(exclude)
    return sorted(str(o).strip() for o in overrides if _split(o)[0] not in skip)


def run_id(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """8 hex digits identifying a run's overrides (order-insensitive; excluded keys left out)."""
    return hashlib.sha256("\n".join(kept_overrides(overrides, exclude)).encode()).hexdigest()[:8]


def _token(override: str) -> str:
    key, value = _split(override)
    leaf = _UNSAFE.sub("-", re.split(r"[./]", key)[-1]).strip("-") or "key"
    value = value.strip("'\"")
    if "/" in value:
        value = Path(value.rstrip("/")).name  # a path: its last part
    value = _UNSAFE.sub("-", value).strip("-")
    return f"{leaf}-{value}" if value and len(value) <= VALUE_CHARS else leaf


def run_slug(overrides: Iterable[str], exclude: Iterable[str] = (), max_chars: int = SLUG_CHARS) -> str:
    """A short safe reading of the overrides in command-line order (``lr-0.0003_steps-200``); '' when none."""
    skip = set(exclude)
    slug = ""
    for tok in (_token(o) for o in overrides if _split(o)[0] not in skip):
        cand = f"{slug}_{tok}" if slug else tok
        if len(cand) > max_chars:
            return slug or tok[:max_chars]
        slug = cand
    return slug


def run_name(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """``<slug>_<id>`` (or ``<id>``): the part of a run directory's name after its time stamp."""
    overrides = list(overrides)
    slug = run_slug(overrides, exclude)
    rid = run_id(overrides, exclude)
    return f"{slug}_{rid}" if slug else rid


def swept_keys(sweep_dir: str | Path) -> Optional[set[str]]:
    """The keys a sweep varies, read from the command saved in ``<sweep_dir>/multirun.yaml`` (None if unknown)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    try:
        command = [str(o) for o in OmegaConf.load(path).hydra.overrides.task]
        return {_split(o.input_line)[0] for o in OverridesParser.create().parse_overrides(command) if o.is_sweep_override()}
    except Exception:  # no file yet, or not a Hydra sweep's: fall back to every override
        return None


def point_suffix(overrides: Iterable[str], exclude: Iterable[str] = (), sweep_dir: Optional[str | Path] = None) -> str:
    """``_<slug>`` of a sweep point (its number keeps it unique), '' without overrides.

    With the sweep's directory, only the swept keys name the point (``3_lr-0.0003_mode-causal``):
    the overrides every point shares are in the sweep summary, and would only push the swept values
    out of a short name. Otherwise every override, in command order.
    """
    overrides = list(overrides)
    swept = swept_keys(sweep_dir) if sweep_dir is not None else None
    if swept:
        overrides = [o for o in overrides if _split(o)[0] in swept]
    slug = run_slug(overrides, exclude)
    return f"_{slug}" if slug else ""


def register_resolvers() -> None:
    """The resolvers ``configs/config.yaml`` names run directories with (idempotent).

    Cached: the time stamp and name of a run are fixed the first time Hydra resolves them.
    """
    from omegaconf import OmegaConf

    def stamp(overrides: Any, exclude: Any) -> str:
        return f"{_dt.datetime.now():%Y%m%d-%H%M%S}_{run_name(list(overrides), list(exclude))}"

    if not OmegaConf.has_resolver("ws_run_name"):
        OmegaConf.register_new_resolver("ws_run_name", stamp, use_cache=True)
    if not OmegaConf.has_resolver("ws_point_name"):
        OmegaConf.register_new_resolver("ws_point_name", lambda o, e, d: point_suffix(list(o), list(e), str(d)), use_cache=True)


# ------------------------------------------------------------------------------------------------
# Finding a run again
# ------------------------------------------------------------------------------------------------


def runs_with_id(parent: Path, rid: str) -> list[Path]:
    """Run directories under ``parent`` whose name carries ``rid``, oldest first (names start with the time)."""
    pattern = re.compile(rf"^{_TIME_RE}_(?:.+_)?{re.escape(rid)}$")
    if not Path(parent).is_dir():
        return []
    return sorted(d for d in Path(parent).iterdir() if d.is_dir() and pattern.match(d.name))


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is one checkpoint (``<run>/ckpt/step_N``, with its completion marker)."""
    from train.checkpoint import MARKER

    return (Path(path) / MARKER).is_file()


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run directory (its resolved config, run record or checkpoints)."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("config.yaml", RUN_INFO, "ckpt"))


def resume_run_dir(resume: Optional[str], out_root: str | Path, name: str, overrides: Sequence[str],
                   exclude: Sequence[str] = ()) -> Optional[Path]:
    """The directory a ``python -m train`` run with ``checkpoint.resume=resume`` continues in.

    None: a new run directory (no resume, or a checkpoint directory to start a new run from).
    ``latest``: the newest earlier run of ``<out_root>/<name>`` with the same id. A run directory:
    itself. Raises :class:`RunNotFoundError` naming where it looked.
    """
    if resume is None or str(resume).strip() == "":
        return None
    if resume == "latest":
        parent = Path(out_root) / name
        rid = run_id(overrides, exclude)
        found = runs_with_id(parent, rid)
        if found:
            return found[-1].resolve()
        others = sorted(d.name for d in parent.iterdir() if d.is_dir()) if parent.is_dir() else []
        shown = ", ".join(others[-5:]) if others else "none"
        raise RunNotFoundError(
            f"checkpoint.resume=latest: no earlier run of experiment '{name}' with these overrides "
            f"(run id {rid}: {kept_overrides(overrides, exclude) or 'no overrides'}) under {parent.resolve()} "
            f"(run directories there: {shown}). Start the run without checkpoint.resume, or resume one by path: "
            f"checkpoint.resume=<run directory>"
        )
    path = Path(resume)
    if is_checkpoint_dir(path):
        return None  # a new run directory starts from this checkpoint (the trainer loads it)
    if is_run_dir(path):
        return path.resolve()
    what = "does not exist" if not path.exists() else "is neither a run directory (config.yaml, ckpt/) nor a checkpoint (COMPLETE marker)"
    raise RunNotFoundError(f"checkpoint.resume={resume}: {what}")


def write_run_info(run_dir: Path, name: str, overrides: Sequence[str], exclude: Sequence[str] = ()) -> Path:
    """``<run_dir>/run.json``: the experiment, every override of the command, the run id."""
    from train.checkpoint import write_text_atomic

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": name, "overrides": list(overrides), "id": run_id(overrides, exclude),
            "command": "python -m train " + " ".join(overrides),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path = run_dir / RUN_INFO
    write_text_atomic(path, json.dumps(info, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Sweep summary
# ------------------------------------------------------------------------------------------------


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _overrides_of(run_dir: Path) -> list[str]:
    info = run_dir / RUN_INFO
    if info.is_file():
        try:
            return list(json.loads(info.read_text()).get("overrides") or [])
        except ValueError:
            pass
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(hydra_overrides)]
    return []


def run_record(run_dir: Path) -> dict[str, Any]:
    """One row of a summary: overrides, status, step, final loss, last evaluation metrics, bundle."""
    run_dir = Path(run_dir)
    status: dict[str, Any] = {}
    if (run_dir / "status.json").is_file():
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except ValueError:
            status = {"status": "unreadable status.json"}
    rows = _json_lines(run_dir / "metrics.jsonl")
    loss = next((r["loss"] for r in reversed(rows) if isinstance(r.get("loss"), (int, float))), None)
    evals: dict[str, float] = {}
    for r in rows:  # the latest value of every sample / evaluation metric
        evals.update({k: v for k, v in r.items() if k.startswith("sample/") and isinstance(v, (int, float))})
    step = status.get("step", rows[-1].get("step") if rows else None)
    bundle = run_dir / "export" / "bundle"
    return {"run": run_dir.name, "path": str(run_dir), "overrides": _overrides_of(run_dir),
            "status": status.get("status", "running?" if rows else "not started"), "step": step,
            "loss": loss, "metrics": evals, "bundle": str(bundle) if bundle.is_dir() else None}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table: run, overrides that differ between runs, status, step, loss, metrics."""
    common = set.intersection(*(set(r["overrides"]) for r in records)) if records else set()
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    head = ["run", "overrides", "status", "step", "loss", *(k.removeprefix("sample/") for k in metric_keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        diff = " ".join(o for o in r["overrides"] if o not in common) or "(same as all)"
        cells = [r["run"], diff, r["status"], r["step"], r["loss"], *(r["metrics"].get(k) for k in metric_keys)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if common:
        lines += ["", "Overrides shared by every run: " + " ".join(f"`{o}`" for o in sorted(common))]
    return "\n".join(lines) + "\n"


def find_runs(folder: Path) -> list[Path]:
    """Run directories directly under ``folder`` (sweep points or an experiment's runs), in name order.

    Sweep points (``<num>_...``) sort by their number.
    """
    folder = Path(folder)
    runs = [d for d in folder.iterdir() if is_run_dir(d)] if folder.is_dir() else []

    def key(d: Path) -> tuple[int, str]:
        m = re.match(r"^(\d+)(?:_|$)", d.name)
        return (int(m.group(1)) if m and not re.match(_TIME_RE, d.name) else -1, d.name)

    return sorted(runs, key=key)


def write_summary(folder: str | Path) -> Path:
    """Write ``summary.md`` and ``summary.json`` for the runs under ``folder``; returns the markdown path."""
    from train.checkpoint import write_text_atomic

    folder = Path(folder)
    runs = find_runs(folder)
    if not runs:
        raise RunNotFoundError(f"{folder}: no run directories (with config.yaml, run.json or ckpt/) to summarise")
    records = [run_record(d) for d in runs]
    title = f"# Runs in {folder}\n\n"
    write_text_atomic(folder / "summary.json", json.dumps(records, indent=1) + "\n")
    path = folder / "summary.md"
    write_text_atomic(path, title + summary_table(records) + "\nFull records (every override, bundle paths): summary.json\n")
    return path


class SweepSummary(Callback):
    """Hydra callback (``configs/config.yaml``): at the end of ``python -m train -m``, summarise the sweep."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            path = write_summary(sweep_dir)
        except Exception as e:  # a summary must never turn a finished sweep into a failure: say why there is none
            print(f"[worldsmith] no sweep summary: {e}", file=sys.stderr, flush=True)
            return
        print(f"[worldsmith] sweep summary: {path}", flush=True)
        print(path.read_text(), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.runs", description="Summarise a sweep (or any directory of runs) in summary.md / summary.json.")
    p.add_argument("folder", help="a sweep directory (outputs/<name>/multirun-<time>) or an experiment's directory (outputs/<name>)")
    args = p.parse_args(argv)
    try:
        path = write_summary(args.folder)
    except RunNotFoundError as e:
        print(f"train.runs: {e}", file=sys.stderr)
        return 2
    print(path.read_text(), end="")
    print(f"written: {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
