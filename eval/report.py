"""Evaluation reports: ``report.json``, ``report.md``, PNG plots (metric vs frame) and PNG strips.

One :class:`BundleReport` per evaluated model; bundles share every table, so an ablation reads as
rows of one table. Plots are drawn with OpenCV (matplotlib is not a dependency): one PNG per
protocol metric, one line per bundle. Strips put the reference frames above the generated ones.
``report.json`` holds every number (non-finite values are written as null; the notes say why).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from eval.protocols.config import PROTOCOLS
from eval.protocols.scoring import Example, ProtocolResult

__all__ = ["BundleReport", "ReportFiles", "write_report", "line_plot", "write_strip", "SUMMARY_COLUMNS"]

# (protocol, summary key, header, format) of the main table: the paper's columns plus action accuracy.
SUMMARY_COLUMNS = (
    ("short", "psnr", "short PSNR↑", "{:.2f}"),
    ("short", "ssim", "SSIM↑", "{:.3f}"),
    ("short", "lpips", "LPIPS↓", "{:.3f}"),
    ("short", "R_dist_deg", "R_dist°↓", "{:.2f}"),
    ("short", "T_dist", "T_dist↓", "{:.3f}"),
    ("long", "self_psnr", "long PSNR↑", "{:.2f}"),
    ("long", "self_ssim", "SSIM↑", "{:.3f}"),
    ("long", "self_lpips", "LPIPS↓", "{:.3f}"),
    ("long", "R_dist_deg", "R_dist°↓", "{:.2f}"),
    ("long", "T_dist", "T_dist↓", "{:.3f}"),
    ("action", "action_acc", "action acc↑", "{:.1%}"),
    ("action", "fine_action_acc", "fine acc↑", "{:.1%}"),
)
TRUTH_COLUMNS = (
    ("long", "truth_psnr", "PSNR↑", "{:.2f}"),
    ("long", "truth_ssim", "SSIM↑", "{:.3f}"),
    ("long", "truth_lpips", "LPIPS↓", "{:.3f}"),
    ("long", "num_truth_clips", "clips", "{:.0f}"),
)
HOLD_COLUMNS = (
    ("short", "psnr", "short PSNR↑", "{:.2f}"),
    ("short", "hold_psnr", "first frame held", "{:.2f}"),
    ("short", "gain_psnr", "gain dB↑", "{:.2f}"),
    ("short", "ssim", "SSIM↑", "{:.3f}"),
    ("short", "hold_ssim", "held SSIM", "{:.3f}"),
)
CONTROL_COLUMNS = (
    ("control", "control", "control dB↑", "{:.2f}"),
    ("control", "follow_psnr", "PSNR own path↑", "{:.2f}"),
    ("control", "swap_psnr", "PSNR other path", "{:.2f}"),
    ("control", "null_cost", "null-control cost dB↑", "{:.2f}"),
    ("control", "truth_separation", "truths' PSNR", "{:.2f}"),
    ("control", "num_clips", "clips", "{:.0f}"),
)
CAMERA_COLUMNS = (
    ("short", "camera_finite", "short: clips with poses", "{:.0%}"),
    ("short", "gt_camera_finite", "oracle", "{:.0%}"),
    ("long", "camera_finite", "long: clips with poses", "{:.0%}"),
    ("long", "gt_camera_finite", "oracle", "{:.0%}"),
)
ORACLE_COLUMNS = (
    ("short", "gt_R_dist_deg", "short R_dist°", "{:.2f}"),
    ("short", "gt_T_dist", "short T_dist", "{:.3f}"),
    ("long", "gt_R_dist_deg", "long R_dist°", "{:.2f}"),
    ("long", "gt_T_dist", "long T_dist", "{:.3f}"),
    ("action", "gt_action_acc", "action acc", "{:.1%}"),
    ("action", "gt_fine_action_acc", "fine acc", "{:.1%}"),
)
_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127))


@dataclass
class BundleReport:
    """One evaluated model: its name, where it came from, its settings and its protocol results."""

    name: str
    path: str
    results: dict[str, ProtocolResult]
    meta: dict[str, Any] = field(default_factory=dict)  # stage, step, config_hash, code_version, ...
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportFiles:
    """Paths of everything a report wrote."""

    json: Path
    markdown: Path
    plots: list[Path]
    strips: list[Path]


# ---------------------------------------------------------------- drawing


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def line_plot(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (720, 420),
) -> Path:
    """Draw lines (name -> (x, y)) on labelled axes and save a PNG; non-finite points break the line."""
    W, H = size
    img = np.full((H, W, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 46, 50
    pts = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(float(y))]
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (left, 18), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    if not pts:
        cv2.putText(img, "no finite values", (W // 2 - 80, H // 2), font, 0.6, (80, 80, 80), 1, cv2.LINE_AA)
    else:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        pad = 0.05 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.05, 0.5)
        y0, y1 = y0 - pad, y1 + pad

        def px(x: float, y: float) -> tuple[int, int]:
            return (int(round(left + (x - x0) / (x1 - x0) * (W - left - right))),
                    int(round(H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))))

        for ty in _nice_ticks(y0, y1):
            _, yy = px(x0, ty)
            cv2.line(img, (left, yy), (W - right, yy), (225, 225, 225), 1)
            cv2.putText(img, _fmt_tick(ty), (5, yy + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
        for tx in _nice_ticks(x0, x1, 8):
            xx, _ = px(tx, y0)
            cv2.line(img, (xx, H - bottom), (xx, H - bottom + 4), (60, 60, 60), 1)
            cv2.putText(img, _fmt_tick(tx), (xx - 8, H - bottom + 18), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
        for k, (name, (xs, ys)) in enumerate(series.items()):
            color = _COLORS[k % len(_COLORS)][::-1]  # RGB table -> BGR
            run: list[tuple[int, int]] = []
            for x, y in list(zip(xs, ys)) + [(math.nan, math.nan)]:
                if math.isfinite(float(y)) and math.isfinite(float(x)):
                    run.append(px(float(x), float(y)))
                    continue
                if len(run) > 1:
                    cv2.polylines(img, [np.array(run, np.int32)], False, color, 2, cv2.LINE_AA)
                elif len(run) == 1:
                    cv2.circle(img, run[0], 3, color, -1, cv2.LINE_AA)
                run = []
            ly = top + 14 + 18 * k
            cv2.line(img, (W - right - 190, ly - 4), (W - right - 165, ly - 4), color, 2)
            cv2.putText(img, name[:24], (W - right - 160, ly), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (W - right, H - bottom), (0, 0, 0), 1)
    cv2.putText(img, xlabel, (W // 2 - 30, H - 12), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, top - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write plot {path}")
    return path


def write_strip(path: str | Path, example: Example, num: int = 8, min_height: int = 96) -> Path:
    """A PNG of ``num`` evenly spaced frame pairs: ``example.top`` above ``example.bottom``, labelled.

    Small frames are enlarged (nearest neighbour) to at least ``min_height`` pixels per row.
    """
    top, bottom = np.asarray(example.top), np.asarray(example.bottom)
    if top.shape != bottom.shape or top.ndim != 4 or top.dtype != np.uint8:
        raise ValueError(f"strip {path}: top and bottom must be uint8 [N, H, W, 3] of one shape, got {top.shape} and {bottom.shape}")
    n = min(num, top.shape[0])
    idx = np.linspace(0, top.shape[0] - 1, n).round().astype(int)
    rows = [np.concatenate(list(frames[idx]), axis=1) for frames in (top, bottom)]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, -(-min_height // top.shape[1]))
    if scale > 1:
        grid = cv2.resize(grid, (grid.shape[1] * scale, grid.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    bar = np.full((22, grid.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, f"{example.title}: top = {example.top_label}, bottom = {example.bottom_label}",
                (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([bar, grid]), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write strip {path}")
    return path


# ---------------------------------------------------------------- tables and files


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _cell(bundle: BundleReport, protocol: str, key: str, fmt: str, lpips_ok: bool) -> str:
    res = bundle.results.get(protocol)
    if res is None:
        return "—"
    if "lpips" in key and not lpips_ok:
        return "n/a"
    v = res.summary.get(key, math.nan)
    if v is None or not math.isfinite(v):
        return "NaN"
    lo, hi = res.intervals.get(key, (math.nan, math.nan))
    if math.isfinite(lo) and math.isfinite(hi) and not fmt.endswith("%}") and key != "num_clips":
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"  # 95 % bootstrap interval over clips
    return fmt.format(v)


def _table(bundles: Sequence[BundleReport], columns: Sequence[tuple[str, str, str, str]], lpips_ok: bool) -> list[str]:
    head = "| bundle | " + " | ".join(c[2] for c in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    rows = [f"| {b.name} | " + " | ".join(_cell(b, p, k, f, lpips_ok) for p, k, _, f in columns) + " |" for b in bundles]
    return [head, sep, *rows]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_report(
    out_dir: str | Path,
    bundles: Sequence[BundleReport],
    *,
    config: Optional[dict[str, Any]] = None,
    lpips_status: str = "",
    lpips_available: bool = False,
    data: str = "",
    strip_frames: int = 8,
) -> ReportFiles:
    """Write report.json, report.md, plots/*.png and strips/*.png for ``bundles`` under ``out_dir``.

    ``lpips_status`` is LPIPS' one-line status (printed in the report); with ``lpips_available``
    False the LPIPS columns read "n/a". ``config`` (JSON-able) and ``data`` are recorded as given.
    """
    if not bundles:
        raise ValueError("write_report: no bundles to report")
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise ValueError(f"write_report: bundle names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocols = [p for p in PROTOCOLS if any(p in b.results for b in bundles)]
    lpips_ok = lpips_available

    plots: list[Path] = []
    for proto in protocols:
        metrics = sorted({m for b in bundles if proto in b.results for m in b.results[proto].curves})
        for metric in metrics:
            series, xlabel = {}, "frame"
            for b in bundles:
                curve = b.results.get(proto, ProtocolResult(proto)).curves.get(metric)
                if curve:
                    series[b.name] = (curve["x"], curve["y"])
                    xlabel = curve.get("xlabel", xlabel)
            plots.append(line_plot(out / "plots" / f"{proto}_{_slug(metric)}.png", series,
                                   f"{proto}: {metric} (mean over clips)", xlabel, metric))
    strips: list[Path] = []
    for b in bundles:
        for proto in protocols:
            res = b.results.get(proto)
            for k, ex in enumerate(res.examples if res else []):
                strips.append(write_strip(out / "strips" / f"{_slug(b.name)}_{proto}_{k}.png", ex, strip_frames))

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc = {
        "created": created,
        "data": data,
        "config": config or {},
        "lpips": lpips_status,
        "bundles": [
            {
                "name": b.name, "path": b.path, "meta": b.meta, "settings": b.settings,
                "protocols": {
                    p: {"summary": r.summary, "intervals": r.intervals, "curves": r.curves, "clips": r.clips, "notes": r.notes, "seconds": r.seconds}
                    for p, r in b.results.items()
                },
            }
            for b in bundles
        ],
        "plots": [str(p.relative_to(out)) for p in plots],
        "strips": [str(p.relative_to(out)) for p in strips],
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")

    md = ["# Evaluation report", "", f"Created {created}. Data: `{data}`.", ""]
    if config:
        keys = ("num", "seed", "device", "steps", "short_latents", "long_latents", "action_latents", "pose_mode")
        md.append("Settings: " + ", ".join(f"{k}={config.get(k)}" for k in keys if k in config) + ".")
        md.append("")
    md += [f"**{lpips_status}**" if lpips_status else "", "",
           "How to read this report: `eval/README.md` (section *Reading a report*).", "",
           "## Summary", "",
           "The paper's table (short: re-generated held-out clips vs ground truth; long: return path vs the",
           "frames generated on the way out) plus WorldCompass action accuracy. R_dist in degrees, T_dist in",
           "the trajectory's units after one scale fit. Brackets: 95 % bootstrap interval of the mean over clips.", ""]
    md += _table(bundles, [c for c in SUMMARY_COLUMNS if c[0] in protocols], lpips_ok)
    if "short" in protocols:
        md += ["", "## Short: against the first frame held still", "",
               "The static reference: the clip's first frame repeated. The gain is the model's PSNR minus the",
               "reference's on the same clips (paired); at or below 0 the model has not learnt the motion.", ""]
        md += _table(bundles, HOLD_COLUMNS, lpips_ok)
    if "long" in protocols:
        md += ["", "## Long: return path vs the true render (synthetic world)", ""]
        md += _table(bundles, TRUTH_COLUMNS, lpips_ok)
    if "control" in protocols:
        md += ["", "## Control: does the video follow the commanded path?", "",
               "Two paths from one start, generated with the same seed: dB closer to its own path's truth than to",
               "the other's (0 = the controls are ignored), and the dB lost when the network's action and camera",
               "inputs are cut (action 0, identity cameras).", ""]
        md += _table(bundles, CONTROL_COLUMNS, lpips_ok)
    cams = [c for c in CAMERA_COLUMNS if c[0] in protocols]
    if cams:
        md += ["", "## Camera estimates: share of clips with a finite pose error", ""]
        md += _table(bundles, cams, lpips_ok)
    oracle = [c for c in ORACLE_COLUMNS if c[0] in protocols]
    if oracle:
        md += ["", "## Estimator on ground-truth frames (oracle)", "",
               "The same pose estimator on real frames of the same paths: a model cannot be measured better",
               "than this. NaN: the estimator found no usable pose (frames too small or too plain).", ""]
        md += _table(bundles, oracle, lpips_ok)
    md += ["", "## Bundles", "", "| bundle | path | stage | step | config | size | latents/unit | steps |", "|---|---|---|---|---|---|---|---|"]
    for b in bundles:
        s, m = b.settings, b.meta
        roll = s.get("rollout", {})
        md.append(f"| {b.name} | `{b.path}` | {m.get('stage')} | {m.get('step')} | {m.get('config_hash')} | "
                  f"{s.get('height')}x{s.get('width')} | {roll.get('chunk_size') if roll.get('mode') == 'ar' else roll.get('window_latents')} "
                  f"({roll.get('mode')}) | {roll.get('steps') if roll.get('schedule') == 'euler' else roll.get('schedule')} |")
    notes = [(b.name, p, n) for b in bundles for p, r in b.results.items() for n in r.notes]
    clip_reasons = [(b.name, p, c["clip"], c["reason"]) for b in bundles for p, r in b.results.items()
                    for c in r.clips if c.get("reason")]
    if notes or clip_reasons:
        md += ["", "## Notes", ""]
        md += [f"- {name} / {p}: {n}" for name, p, n in notes]
        md += [f"- {name} / {p} / {clip}: {reason}" for name, p, clip, reason in clip_reasons[:20]]
        if len(clip_reasons) > 20:
            md.append(f"- ... {len(clip_reasons) - 20} more clip notes in report.json")
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    if strips:
        md += ["", "## Strips", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in strips]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    return ReportFiles(json_path, md_path, plots, strips)
