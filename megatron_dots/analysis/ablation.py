"""Shared-expert ablation: each domain's loss with the full MoE output, without the shared
experts' output (`no-shared`) and without the routed experts' output (`shared-only`), on the
same windows, with paired bootstrap intervals over windows and a verdict.

Verdict: the shared experts' removal is a *uniform* loss rise when every domain's rise is
significant (its 95% interval lies above zero) and the largest relative rise is at most
`UNIFORM_FACTOR` times the smallest; *domain-specific* when some domains rise significantly
and others do not, or the relative rises differ by more than that; *no measurable rise* when
none does.
"""

import csv
import io
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .bootstrap import interval, resample_weights

VARIANTS = ("full", "no-shared", "shared-only")
CSV_COLUMNS = ("domain", "variant", "loss", "tokens")
UNIFORM_FACTOR = 2.0


@dataclass
class DomainLosses:
    """Per-window summed cross entropy of each variant, and predicted positions per window."""

    domain: str
    loss_sum: Dict[str, np.ndarray]  # variant -> [W]
    predicted: np.ndarray  # [W]

    def loss(self, variant: str) -> float:
        return float(self.loss_sum[variant].sum() / self.predicted.sum())

    @property
    def tokens(self) -> int:
        return int(self.predicted.sum())


def write_ablation_csv(results: List[DomainLosses]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        for variant in VARIANTS:
            writer.writerow([result.domain, variant, f"{result.loss(variant):.6f}", result.tokens])
    return out.getvalue()


def ablation_summary(results: List[DomainLosses], replicates: int = 1000, seed: int = 0) -> Dict:
    """`ablation.json`: per domain and variant the loss with its interval, and each ablated
    variant's rise over `full` (absolute and relative) with a paired interval; the verdict."""
    rng = np.random.default_rng(seed)
    domains = {}
    for result in results:
        weights = resample_weights(len(result.predicted), replicates, rng)
        predicted = weights @ result.predicted.astype(np.float64)
        boot = {v: (weights @ result.loss_sum[v]) / predicted for v in VARIANTS}
        entry = {"tokens": result.tokens, "windows": int(len(result.predicted))}
        for variant in VARIANTS:
            low, high = interval(boot[variant])
            entry[variant] = {"loss": result.loss(variant), "low": float(low),
                              "high": float(high)}
            if variant != "full":
                rise = boot[variant] - boot["full"]
                low, high = interval(rise)
                full = result.loss("full")
                entry[variant].update({
                    "rise": result.loss(variant) - full, "rise_low": float(low),
                    "rise_high": float(high),
                    "relative_rise": (result.loss(variant) - full) / full if full else None})
        domains[result.domain] = entry
    summary = {"variants": list(VARIANTS), "domains": domains,
               "interval": "paired bootstrap 95% percentile interval over windows",
               "replicates": replicates, "seed": seed}
    summary["verdict"] = verdict(summary)
    return summary


def verdict(summary: Dict) -> Dict:
    """Uniform, domain-specific or no measurable rise when the shared experts are removed."""
    entries = {d: e["no-shared"] for d, e in summary["domains"].items()}
    rising = [d for d, e in entries.items() if e["rise_low"] > 0]
    flat = [d for d in entries if d not in rising]
    relative = {d: e["relative_rise"] for d, e in entries.items()}
    if not rising:
        kind = "no measurable rise"
        reason = "no domain's loss rises significantly without the shared experts"
    elif flat:
        kind = "domain-specific"
        reason = (f"the loss rises significantly on {', '.join(rising)} but not on "
                  f"{', '.join(flat)}")
    else:
        lowest, highest = min(relative.values()), max(relative.values())
        spread = highest / lowest if lowest > 0 else float("inf")
        if spread <= UNIFORM_FACTOR:
            kind = "uniform"
            reason = (f"every domain's loss rises significantly, relative rises within "
                      f"{spread:.2f}x of each other (uniform means <= {UNIFORM_FACTOR:g}x)")
        else:
            kind = "domain-specific"
            reason = (f"every domain's loss rises, but the relative rises differ "
                      f"{spread:.2f}x (more than {UNIFORM_FACTOR:g}x)")
    return {"kind": kind, "reason": reason, "relative_rise": relative}


def verdict_lines(summary: Dict) -> List[str]:
    """What `analyze ablate-shared` prints: the table, then the verdict with its numbers."""
    lines = [f"{'domain':16s} {'tokens':>9s} {'full':>8s} {'no-shared':>22s} "
             f"{'shared-only':>22s}"]
    for domain, entry in summary["domains"].items():
        cells = []
        for variant in ("no-shared", "shared-only"):
            e = entry[variant]
            cells.append(f"{e['loss']:8.4f} ({e['rise']:+.4f})")
        lines.append(f"{domain:16s} {entry['tokens']:9d} {entry['full']['loss']:8.4f} "
                     f"{cells[0]:>22s} {cells[1]:>22s}")
    result = summary["verdict"]
    lines.append(f"verdict: {result['kind']}: {result['reason']}")
    for domain, entry in summary["domains"].items():
        e = entry["no-shared"]
        lines.append(f"  {domain}: no-shared {e['rise']:+.4f} nats "
                     f"[{e['rise_low']:+.4f}, {e['rise_high']:+.4f}], "
                     f"{e['relative_rise']:+.1%} of {entry['full']['loss']:.4f}")
    return lines
