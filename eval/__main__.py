"""``python -m eval``: evaluate one or more bundles with the same protocols and write one report.

    python -m eval --bundle runs/a/export/bundle --bundle runs/b/export/bundle \\
        --protocol all --data data/heldout --out reports/a_vs_b [--num 8] [--seed 0] [--device cuda]

Writes ``report.json``, ``report.md`` (one row per bundle), ``plots/*.png`` and ``strips/*.png``
under ``--out``. Every bundle sees the same clips, seeds and action sequences, so rows compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from eval.lpips import LPIPS, LPIPSConfig
from eval.protocols import ProtocolConfig, VideoModel, evaluate, load_clips, parse_protocols, prepare_clips
from eval.report import BundleReport, ReportFiles, write_report

__all__ = ["main", "evaluate_bundles", "bundle_names"]

_META_KEYS = ("stage", "step", "config_hash", "code_version", "created", "parent")


def bundle_names(paths: Sequence[str | Path]) -> list[str]:
    """Short unique display names: the last path component(s) needed to tell the bundles apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same bundle is given twice: {[str(p) for p in paths]}")


def warn_if_training_data(bundle: str | Path, data: str | Path, name: str) -> bool:
    """Warn (and return True) when ``data`` is the dataset the bundle was trained on (its ``meta.json`` data.path).

    Scores on training clips measure memorisation, not generalisation: evaluate on held-out clips.
    """
    import warnings

    from models.bundle import BundleError, read_bundle_meta

    try:
        trained = ((read_bundle_meta(bundle).get("data") or {}).get("path"))
    except BundleError:
        return False  # loading the bundle names the problem
    if not trained or Path(trained).resolve() != Path(data).resolve():
        return False
    warnings.warn(f"--data {data} is the dataset bundle '{name}' was trained on (its meta.json data.path): these scores "
                  "are on training clips, not held-out ones; evaluate on clips it never saw (e.g. python -m data.synthetic "
                  "with another --seed)", stacklevel=2)
    return True


def evaluate_bundles(
    bundles: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    protocols: str | Sequence[str] = "all",
    cfg: Optional[ProtocolConfig] = None,
    names: Optional[Sequence[str]] = None,
    log=print,
    variants: Sequence[tuple[str, Sequence[str]]] = (),
    variant_bundles: Optional[Sequence[str | Path]] = None,
    resume: bool = False,
) -> ReportFiles:
    """Evaluate each bundle on the first ``cfg.num`` clips of ``data`` and write the report under ``out``.

    ``variants``: (suffix, sampling dotlist) pairs; each adds a row ``<name>+<suffix>`` per bundle,
    sampled with those overrides (e.g. ``("nomem", ["memory.spatial_chunks=0", "memory.anchor=false"])``);
    ``variant_bundles`` limits them to some of the bundles (default: all). ``resume``: each finished row
    is kept under ``out/rows`` and reused by a later call with the same bundle files, data, protocols and
    settings (an evaluation cut off by a time limit continues with the next row).
    """
    cfg = cfg or ProtocolConfig()
    cfg.validate()
    chosen = parse_protocols(protocols)
    names = list(names) if names else bundle_names(bundles)
    if len(names) != len(bundles):
        raise ValueError(f"{len(names)} names for {len(bundles)} bundles")
    for path, name in zip(bundles, names):
        warn_if_training_data(path, data, name)
    raw = load_clips(data, cfg.num)
    lpips = LPIPS(cfg.lpips).to(cfg.device)
    log(f"[eval] {len(raw)} clips from {data}; protocols {chosen}; {lpips.status()}")
    reports = []
    runs = [(path, name, ()) for path, name in zip(bundles, names)]
    varied = None if variant_bundles is None else {Path(b).resolve() for b in variant_bundles}
    runs += [(path, f"{name}+{suffix}", tuple(dots)) for path, name in zip(bundles, names) for suffix, dots in variants
             if varied is None or Path(path).resolve() in varied]

    def report() -> ReportFiles:
        return write_report(out, reports, config=dataclasses.asdict(cfg), lpips_status=lpips.status(),
                            lpips_available=lpips.available, data=str(Path(data).resolve()),
                            strip_frames=cfg.strip_frames)

    try:
        _evaluate_runs(runs, data, out, chosen, cfg, lpips, raw, reports, resume, log)
    except BaseException:
        if reports:  # cut off (a time limit, an error): the rows finished so far still get their report
            log(f"[eval] interrupted after {len(reports)} of {len(runs)} rows; writing their report")
            report()
        raise
    return report()


def _evaluate_runs(runs, data, out, chosen, cfg, lpips, raw, reports: list, resume: bool, log) -> None:
    """Evaluate each (bundle, name, sampling overrides) run in turn, appending to ``reports`` (kept under
    ``out/rows`` when ``resume``)."""
    for path, name, dots in runs:
        t0 = time.perf_counter()
        key = _row_key(path, dots, data, chosen, cfg, lpips.available)
        cached = _load_row(out, name, key) if resume else None
        if cached is not None:
            reports.append(cached)
            log(f"[eval] {name}: kept from an earlier call ({_rows_dir(out)})")
            continue
        model = VideoModel.from_bundle(path, device=cfg.device, dtype=cfg.dtype, steps=cfg.steps, name=name, sampling=dots)
        clips = prepare_clips(raw, model, cfg)
        results = evaluate(model, clips, chosen, cfg, lpips)
        meta = {k: model.meta.get(k) for k in _META_KEYS}
        settings = {**model.settings.to_dict(), "overrides": list(dots)}
        reports.append(BundleReport(name, str(Path(path).resolve()), results, meta, settings))
        if resume:
            _save_row(out, name, key, reports[-1])
        log(f"[eval] {name}: " + "; ".join(f"{p} {r.seconds:.1f}s" for p, r in results.items())
            + f" ({time.perf_counter() - t0:.1f}s)")
        del model


def _rows_dir(out: str | Path) -> Path:
    return Path(out) / "rows"


def _row_key(bundle: str | Path, dots: Sequence[str], data: str | Path, protocols: Sequence[str], cfg: ProtocolConfig,
             lpips: bool) -> str:
    """What a row's numbers depend on: the bundle's files (size, mtime), the data, protocols and settings."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(bundle).iterdir() if p.is_file())
    return json.dumps({"bundle": str(Path(bundle).resolve()), "files": files, "overrides": list(dots),
                       "data": str(Path(data).resolve()), "protocols": list(protocols), "lpips": lpips,
                       "config": dataclasses.asdict(cfg)}, sort_keys=True, default=str)


def _row_file(out: str | Path, name: str) -> Path:
    return _rows_dir(out) / (re.sub(r"[^A-Za-z0-9.+-]+", "_", name) + ".pt")


def _load_row(out: str | Path, name: str, key: str) -> Optional[BundleReport]:
    """The row saved by an earlier call with the same key, else None."""
    path = _row_file(out, name)
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)  # written by _save_row below
    return saved["report"] if saved.get("key") == key else None


def _save_row(out: str | Path, name: str, key: str, report: BundleReport) -> None:
    """Keep a finished row atomically (a tmp file renamed into place)."""
    path = _row_file(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "report": report}, tmp)
    os.replace(tmp, path)


# Named variants: ``nomem`` keeps the context size but drops the anchor and retrieved chunks (recency only),
# the "memory off" ablation of a bundle whatever its memory budget.
VARIANTS = {"nomem": ["memory.spatial_chunks=0", "memory.anchor=false", "memory.temporal_latents=${memory.max_context}"]}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` (or a named variant, e.g. ``nomem``) -> (NAME, ["KEY=VALUE", ...]).

    SystemExit naming the flag on bad input."""
    if text.strip() in VARIANTS:
        return text.strip(), list(VARIANTS[text.strip()])
    name, sep, rest = text.partition(":")
    dots = [d.strip() for d in rest.split(",") if d.strip()]
    if not sep or not name.strip() or not dots or any("=" not in d for d in dots):
        raise SystemExit(f"python -m eval: --variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE] "
                         f"(e.g. g2:guidance=2) or one of {sorted(VARIANTS)}")
    return name.strip(), dots


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", required=True, help="bundle directory (repeat to compare bundles)")
    p.add_argument("--name", action="append", help="display name per bundle (repeat, in --bundle order)")
    p.add_argument("--protocol", default="all", help="short | long | action | control | all (or a comma-separated list)")
    p.add_argument("--data", required=True, help="dataset directory (index.json + shards) of held-out clips")
    p.add_argument("--out", required=True, help="report directory")
    d = ProtocolConfig()
    p.add_argument("--num", type=int, default=d.num, help=f"clips per protocol (default {d.num})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"], help="DiT weights dtype")
    p.add_argument("--steps", type=int, default=None, help="override the bundles' denoising steps")
    p.add_argument("--batch", type=int, default=d.batch, help=f"clips per batched rollout (default {d.batch}; "
                   "each clip keeps its own seed)")
    p.add_argument("--short-latents", type=int, default=d.short_latents)
    p.add_argument("--long-latents", type=int, default=None, help="default: 4 x each bundle's training window")
    p.add_argument("--action-latents", type=int, default=d.action_latents)
    p.add_argument("--control-latents", type=int, default=d.control_latents)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also evaluate every bundle with these sampling overrides, as row <bundle>+NAME "
                        "(e.g. g2:guidance=2); 'nomem' = the same context size without anchor or retrieval")
    p.add_argument("--resume", action="store_true",
                   help="keep each finished row under OUT/rows and reuse rows a cut-off earlier call finished")
    p.add_argument("--lpips-trunk", default=None, help="torchvision alexnet-owt-7be5be79.pth (default: $TORCH_HOME)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ReportFiles:
    """Parse arguments, evaluate, write the report and print where it is."""
    args = _parser().parse_args(argv)
    cfg = ProtocolConfig(
        num=args.num, seed=args.seed, device=args.device, dtype=args.dtype, steps=args.steps, batch=args.batch,
        short_latents=args.short_latents, long_latents=args.long_latents, action_latents=args.action_latents,
        control_latents=args.control_latents, lpips=LPIPSConfig(trunk_path=args.lpips_trunk),
    )
    try:
        files = evaluate_bundles(args.bundle, args.data, args.out, args.protocol, cfg, args.name,
                                 variants=[parse_variant(v) for v in args.variant], resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"python -m eval: {e}") from e
    md = files.markdown.read_text()
    for section in ("## Summary", "## Control"):
        if section in md:
            table = md.split(section, 1)[-1].split("\n## ", 1)[0]
            print("\n".join(line for line in table.splitlines() if line.startswith("|")))
    print(f"[eval] report: {files.markdown} ({len(files.plots)} plots, {len(files.strips)} strips)")
    return files


if __name__ == "__main__":
    main(sys.argv[1:])
