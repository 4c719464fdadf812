"""Benchmark scenarios: one module each, registered in `SCENARIOS` (name → module).

A scenario module has `NAME`, `SUMMARY` (one line), `DESCRIPTION` (what it measures
and how), `add_arguments(parser)` and `run(args) -> dict` returning `figures`,
`goals` and optionally `series` (for plots) and `notes`.
"""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import (
    actors_scale,
    baseline,
    email_timeliness,
    ingest_email,
    push_latency,
    push_throughput,
    wakeups,
)

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (baseline, ingest_email, actors_scale, email_timeliness, push_throughput,
              push_latency, wakeups)
}
