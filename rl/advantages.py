"""From per-candidate rewards to training weights: the trainer's side of WorldCompass (rl_distill.md §1.5).

Rewards only score; everything that turns scores into an update lives here, once:

1. per reward k, standardise within each group: A_k = (R_k − mean_group R_k) / std, with std over all
   groups (and all ranks: ``global``), within the group (``group``) or the largest group std
   (``group_max``). A group (or reward) without spread gives A_k = 0, never NaN; a candidate whose
   reward is not defined (NaN: e.g. no pose could be estimated) gets A_k = 0 for that reward;
2. rank by S = Σ_k w_k·A_k and keep the top and bottom ``bestofn / 2`` of each group (Best-of-N), shuffled;
3. A = Σ_k (w_k / Σ|w|)·A_k, clipped to ±adv_clip, mapped to the optimality r = A / (2·adv_clip) + ½ ∈ [0, 1].

The diagnostics WorldCompass and DiffusionNFT log come with it: each component's mean, the share of
groups with zero spread, the share of undefined rewards, and a histogram of the kept advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Advantages", "standardize", "compute_advantages", "HIST_BINS"]

HIST_BINS = 8  # histogram bins of the kept advantages over [-adv_clip, adv_clip]
Reduce = Callable[[Tensor], Tensor]  # sums a tensor over ranks (all_reduce SUM); None in one process


@dataclass
class Advantages:
    """Advantages of N candidates in groups; tensors on the rewards' device."""

    advantage: Tensor  # [N] combined, clipped advantage
    r: Tensor  # [N] optimality in [0, 1]
    kept: Tensor  # [K] int64 rows kept for training (Best-of-N), shuffled
    score: Tensor  # [N] ranking score sum_k w_k A_k
    components: dict[str, Tensor] = field(default_factory=dict)  # reward -> standardised A_k [N]
    metrics: dict[str, float] = field(default_factory=dict)


def _group_stats(values: Tensor, valid: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [G], population std [G], count [G]) of the valid values per group (0 where a group has none)."""
    v = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, valid.to(values.dtype))
    total = torch.zeros_like(count).index_add_(0, group, v)
    mean = total / count.clamp_min(1)
    dev = torch.where(valid, values - mean[group], torch.zeros((), dtype=values.dtype, device=values.device))
    var = torch.zeros_like(count).index_add_(0, group, dev.square()) / count.clamp_min(1)
    return mean, var.sqrt(), count


def standardize(
    values: Tensor, group: Tensor, std_type: str = "global", *, reduce: Optional[Reduce] = None, eps: float = 1e-8
) -> tuple[Tensor, dict[str, float]]:
    """Group-standardised advantages A [N] of rewards ``values`` [N] (NaN = undefined) in groups ``group`` [N].

    Returns A (0 where undefined or without spread) and diagnostics: ``zero_std_groups`` (share of groups
    whose valid rewards have no spread, or fewer than two), ``nan_share``, ``std`` (the divisor used,
    mean over groups).
    """
    values = values.double()
    group = group.to(device=values.device, dtype=torch.long)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    valid = torch.isfinite(values)
    mean, gstd, count = _group_stats(values, valid, group, num_groups)
    flat = (gstd <= eps) | (count < 2)
    if std_type == "group":
        std = gstd[group]
    elif std_type == "group_max":
        std = gstd.max().expand_as(values) if num_groups else gstd.new_zeros(values.shape)
    elif std_type == "global":
        v = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
        moments = torch.stack([valid.double().sum(), v.sum(), v.square().sum()])
        if reduce is not None:
            moments = reduce(moments)
        n, s, ss = moments[0].clamp_min(1), moments[1], moments[2]
        std = ((ss / n - (s / n).square()).clamp_min(0).sqrt()).expand_as(values)
    else:
        raise ValueError(f"std_type must be 'global', 'group' or 'group_max', got {std_type!r}")
    ok = valid & (std > eps) & ~flat[group]
    adv = torch.where(ok, (values - mean[group]) / std.clamp_min(eps), torch.zeros((), dtype=values.dtype, device=values.device))
    diag = {
        "zero_std_groups": float(flat.double().mean()) if num_groups else float("nan"),
        "nan_share": float((~valid).double().mean()) if values.numel() else float("nan"),
        "std": float(std.mean()) if values.numel() else float("nan"),
    }
    return adv, diag


def _nanmean(x: Tensor) -> float:
    x = x.double()
    ok = torch.isfinite(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


def compute_advantages(
    rewards: dict[str, Tensor],
    group: Tensor,
    weights: dict[str, float],
    *,
    std_type: str = "global",
    bestofn: int = 6,
    adv_clip: float = 2.0,
    generator: Optional[torch.Generator] = None,
    reduce: Optional[Reduce] = None,
) -> Advantages:
    """Advantages, Best-of-N selection and optimality r of N candidates (see the module docstring).

    rewards: score name -> [N] (NaN = undefined); only names in ``weights`` count (the others are logged).
    group [N]: group id per candidate (0..G-1). generator: shuffles the kept rows (CPU).
    """
    if not rewards:
        raise ValueError("compute_advantages: no rewards")
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise KeyError(f"compute_advantages: weighted rewards {missing} were not computed (have {sorted(rewards)})")
    group = group.long()
    N = group.numel()
    device = next(iter(rewards.values())).device
    group = group.to(device)
    comps: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for name, values in rewards.items():
        if values.shape != (N,):
            raise ValueError(f"compute_advantages: reward {name!r} has shape {tuple(values.shape)}, expected [{N}]")
        a, diag = standardize(values.to(device), group, std_type, reduce=reduce)
        comps[name] = a
        metrics[f"reward/{name}"] = _nanmean(values)
        metrics[f"reward/{name}/zero_std_groups"] = diag["zero_std_groups"]
        metrics[f"reward/{name}/nan_share"] = diag["nan_share"]
    total = sum(abs(float(w)) for w in weights.values())
    if total <= 0:
        raise ValueError(f"compute_advantages: all weights are zero: {weights}")
    score = torch.zeros(N, dtype=torch.float64, device=device)
    adv = torch.zeros(N, dtype=torch.float64, device=device)
    for name, w in weights.items():
        score = score + float(w) * comps[name]
        adv = adv + (float(w) / total) * comps[name]
    adv = adv.clamp(-adv_clip, adv_clip)
    r = (adv / (2 * adv_clip) + 0.5).clamp(0.0, 1.0)

    kept = []
    num_groups = int(group.max()) + 1 if N else 0
    top = bestofn // 2
    bottom = bestofn - top
    flat_groups = 0
    for g in range(num_groups):
        rows = (group == g).nonzero().flatten()
        s = score[rows]
        flat_groups += int(bool((s.max() - s.min()).abs() <= 1e-12))
        if rows.numel() <= bestofn:
            kept.append(rows)
            continue
        order = torch.argsort(s, descending=True, stable=True)
        kept.append(torch.cat([rows[order[:top]], rows[order[-bottom:]]]))
    kept_t = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=device)
    perm = torch.randperm(kept_t.numel(), generator=generator)
    kept_t = kept_t[perm.to(device)]

    edges = torch.linspace(-adv_clip, adv_clip, HIST_BINS + 1, dtype=torch.float64)
    ka = adv[kept_t].cpu()
    idx = torch.bucketize(ka, edges[1:-1], right=False)
    hist = torch.bincount(idx, minlength=HIST_BINS).double() / max(1, ka.numel())
    metrics.update({f"adv/hist_{i}": float(hist[i]) for i in range(HIST_BINS)})
    metrics["adv/zero_std_groups"] = flat_groups / max(1, num_groups)
    metrics["adv/abs_mean"] = float(ka.abs().mean()) if ka.numel() else 0.0
    metrics["adv/r_mean"] = float(r[kept_t].mean()) if kept_t.numel() else 0.5
    metrics["adv/kept"] = float(kept_t.numel())
    return Advantages(adv, r, kept_t, score, comps, metrics)
