"""Expert specialization by domain, from per-window routed-slot counts.

share[d, l, e] = routed slots expert e of MoE layer l received on domain d / all routed slots
of domain d in layer l (top-k slots per token, so shares sum to one per domain and layer).
An expert is dead when its share is below a dead share on every domain, hot when its mean share
over domains is above a hot share (the dots.llm1 report's 0.5 % and 5 % for 128 experts; it
expects no hot expert). Its
specialization ratio on a domain is its share there over its mean share across domains, with a
bootstrap interval over windows (`bootstrap.py`). `write_expert_share_csv` and
`expert_summary` produce `expert_share.csv` and `summary.json`.
"""

import csv
import io
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .bootstrap import interval, resample_weights

# The dots.llm1 report's expectations for its 128 experts (top-6): none above 5 % of the routed
# slots on average, dead under 0.5 %. `analyze experts` scales them by 128 / E for E experts.
DEAD_SHARE = 0.005
HOT_SHARE = 0.05
REPORT_EXPERTS = 128
TOP_SPECIALISTS = 5  # experts listed per domain and layer in summary.json
CSV_COLUMNS = ("domain", "layer", "expert", "share", "count")


@dataclass
class ExpertShares:
    """Routed-slot counts and shares of every domain (order of `domains`)."""

    domains: List[str]
    layers: List[int]  # 1-based model layer numbers of the MoE layers
    counts: np.ndarray  # [D, L, E] routed slots
    window_counts: List[np.ndarray]  # per domain [W_d, L, E]

    @classmethod
    def from_windows(cls, domains: Sequence[str], layers: Sequence[int],
                     window_counts: Sequence[np.ndarray]) -> "ExpertShares":
        per_window = [np.asarray(c, dtype=np.int64) for c in window_counts]
        counts = np.stack([c.sum(axis=0) for c in per_window])
        return cls(list(domains), list(layers), counts, per_window)

    @property
    def shares(self) -> np.ndarray:
        return _shares(self.counts)


def _shares(counts: np.ndarray) -> np.ndarray:
    """Shares along the last axis (each layer's slots sum to one; a layer with none: zeros)."""
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64),
                     where=totals > 0)


def specialization(shares: np.ndarray, domain_axis: int = 0) -> np.ndarray:
    """Ratio of each expert's share on a domain to its mean share over the domains (along
    `domain_axis`; [D, L, E] by default), NaN where the expert receives nothing on any
    domain."""
    mean = shares.mean(axis=domain_axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, shares / mean, np.nan)


def bootstrap_specialization(result: ExpertShares, replicates: int, seed: int = 0):
    """(low, high) [D, L, E] bootstrap percentile interval of the specialization ratios:
    every replicate redraws each domain's windows with replacement (the same draws for every
    layer, one layer at a time to bound memory)."""
    rng = np.random.default_rng(seed)
    weights = [resample_weights(c.shape[0], replicates, rng) for c in result.window_counts]
    low, high = np.empty(result.counts.shape), np.empty(result.counts.shape)
    for l in range(result.counts.shape[1]):
        replicate_shares = np.stack([
            _shares(w @ c[:, l].astype(np.float64)) for w, c in zip(weights, result.window_counts)
        ], axis=1)  # [B, D, E]
        low[:, l], high[:, l] = interval(specialization(replicate_shares, domain_axis=1),
                                         axis=0)
    return low, high


def write_expert_share_csv(result: ExpertShares) -> str:
    """`expert_share.csv` text: one row per domain, layer and expert."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    shares = result.shares
    for d, domain in enumerate(result.domains):
        for l, layer in enumerate(result.layers):
            for e in range(result.counts.shape[2]):
                writer.writerow([domain, layer, e, f"{shares[d, l, e]:.6g}",
                                 int(result.counts[d, l, e])])
    return out.getvalue()


def _number(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def expert_summary(result: ExpertShares, replicates: int = 1000, seed: int = 0,
                   dead_share: float = DEAD_SHARE, hot_share: float = HOT_SHARE) -> Dict:
    """`summary.json`: per layer the max share and its expert on each domain, dead experts
    (below `dead_share` on every domain) and hot ones (mean share above `hot_share`), and the
    specialization ratios with bootstrap intervals (per domain the `TOP_SPECIALISTS`
    highest-ratio experts, and every expert's ratio)."""
    shares = result.shares
    ratio = specialization(shares)
    low, high = bootstrap_specialization(result, replicates, seed)
    layers = []
    for l, layer in enumerate(result.layers):
        entry = {"layer": layer, "domains": {}, "dead_experts": [], "hot_experts": []}
        mean = shares[:, l].mean(axis=0)
        entry["dead_experts"] = [int(e) for e in np.flatnonzero((shares[:, l] < dead_share)
                                                                 .all(axis=0))]
        entry["hot_experts"] = [{"expert": int(e), "mean_share": _number(mean[e])}
                                for e in np.flatnonzero(mean > hot_share)]
        for d, domain in enumerate(result.domains):
            top = int(np.argmax(shares[d, l]))
            order = np.argsort(-np.nan_to_num(ratio[d, l], nan=-1.0), kind="stable")
            entry["domains"][domain] = {
                "max_share": _number(shares[d, l, top]), "max_expert": top,
                "top_specialists": [
                    {"expert": int(e), "ratio": _number(ratio[d, l, e]),
                     "low": _number(low[d, l, e]), "high": _number(high[d, l, e]),
                     "share": _number(shares[d, l, e])}
                    for e in order[:TOP_SPECIALISTS]],
                "ratio": [_number(v) for v in ratio[d, l]],
                "ratio_low": [_number(v) for v in low[d, l]],
                "ratio_high": [_number(v) for v in high[d, l]],
            }
        layers.append(entry)
    return {
        "domains": result.domains,
        "thresholds": {"dead_share": dead_share, "hot_share": hot_share,
                       "uniform_share": 1.0 / result.counts.shape[2],
                       "interval": "bootstrap 95% percentile interval over windows",
                       "replicates": replicates, "seed": seed},
        "overall": _overall(result, shares, low, dead_share, hot_share),
        "layers": layers,
    }


def _overall(result: ExpertShares, shares: np.ndarray, low: np.ndarray, dead_share: float,
             hot_share: float) -> Dict:
    mean = shares.mean(axis=0)  # [L, E]
    dead = (shares < dead_share).all(axis=0)
    l, e = np.unravel_index(int(np.argmax(mean)), mean.shape)
    return {
        "max_mean_share": _number(mean[l, e]), "max_mean_share_at": {
            "layer": result.layers[l], "expert": int(e)},
        "dead_experts": int(dead.sum()), "hot_experts": int((mean > hot_share).sum()),
        "experts": int(mean.size),
        # per domain: experts whose whole interval lies at or above 2x their mean share
        "specialists_2x": {domain: int((np.nan_to_num(low[d], nan=0.0) >= 2.0).sum())
                           for d, domain in enumerate(result.domains)},
    }


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def summary_lines(summary: Dict) -> List[str]:
    """What `analyze experts` prints."""
    overall, limits = summary["overall"], summary["thresholds"]
    at = overall["max_mean_share_at"]
    lines = [f"highest mean share {overall['max_mean_share']:.2%} (layer {at['layer']}, expert "
             f"{at['expert']}; uniform {_percent(limits['uniform_share'])}); "
             f"{overall['hot_experts']} of {overall['experts']} experts above "
             f"{_percent(limits['hot_share'])} on average; {overall['dead_experts']} dead "
             f"(below {_percent(limits['dead_share'])} on every domain)"]
    for domain, count in overall["specialists_2x"].items():
        lines.append(f"{domain}: {count} experts at >= 2x their mean share (whole 95% interval)")
    return lines
