"""Where a push event's time went inside the worker, from herald's own histograms.

A worker observes, for every message push, how long its queue message waited in the
queue (`herald_queue_wait_seconds`, first tries) and how long it spent in each stage
of its PushEngine (`herald_push_stage_seconds{stage}`). `snapshot()` reads them, from
this process's registry (a worker running in-process) or from the workers'
`METRICS_PORT`; `summarise()` turns the difference between two snapshots into a mean
and bucket-interpolated percentiles per step, so a benchmark round can say which step
its latency went to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# The steps in the order an event meets them: (name, histogram, label and its prefix).
STEPS = (
    ("queued", "herald_queue_wait_seconds", ("queue", "push.")),
    ("handoff", "herald_push_stage_seconds", ("stage", "handoff")),
    ("plan", "herald_push_stage_seconds", ("stage", "plan")),
    ("send", "herald_push_stage_seconds", ("stage", "send")),
    ("record", "herald_push_stage_seconds", ("stage", "record")),
)
# Seconds to wait for the workers' last observations after a round has drained.
SETTLE_SECONDS = 30.0


@dataclass
class Histogram:
    """One step's histogram: cumulative counts by upper bound, the sum and the count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - earlier.total, self.count - earlier.count,
        )

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1), interpolated linearly within its bucket."""
        if self.count <= 0:
            return None
        target = q * self.count
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            cumulative = self.buckets[le]
            if cumulative >= target:
                if le == float("inf") or cumulative == below:
                    return lower
                return lower + (target - below) / (cumulative - below) * (le - lower)
            lower, below = le, cumulative
        return lower


Snapshot = dict[str, Histogram]


def _collect(families: Iterable[Any], into: Snapshot) -> None:
    wanted = {metric for _, metric, _ in STEPS}
    for family in families:
        if family.name not in wanted:
            continue
        for step, metric, (label, prefix) in STEPS:
            if metric != family.name:
                continue
            one = into.setdefault(step, Histogram())
            for sample in family.samples:
                if not str(sample.labels.get(label, "")).startswith(prefix):
                    continue
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    one.buckets[le] = one.buckets.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    one.total += sample.value
                elif sample.name.endswith("_count"):
                    one.count += sample.value


def snapshot(metrics_urls: Sequence[str] = ()) -> Snapshot:
    """The step histograms now: summed over `metrics_urls` (workers' `/metrics`), or this
    process's own registry when there are none."""
    found: Snapshot = {}
    if not metrics_urls:
        from prometheus_client import REGISTRY

        _collect(REGISTRY.collect(), found)
        return found
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for url in metrics_urls:
        _collect(text_string_to_metric_families(httpx.get(url, timeout=10).text), found)
    return found


def difference(after: Snapshot, before: Snapshot) -> Snapshot:
    return {step: one.minus(before.get(step, Histogram())) for step, one in after.items()}


def count_since(step: str, before: Snapshot, metrics_urls: Sequence[str] = ()) -> int:
    """How many events `step` has counted since `before`."""
    now = snapshot(metrics_urls).get(step, Histogram())
    return int(now.minus(before.get(step, Histogram())).count)


def summarise(steps: Snapshot) -> dict[str, dict[str, float | None]]:
    """Per step: events counted, mean, p50 and p90 (seconds)."""
    return {
        step: {
            "count": one.count,
            "mean_s": one.total / one.count if one.count else None,
            "p50_s": one.quantile(0.5),
            "p90_s": one.quantile(0.9),
        }
        for step, _, _ in STEPS
        if (one := steps.get(step)) is not None
    }
