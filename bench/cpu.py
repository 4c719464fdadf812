"""CPU time by process over a benchmark's window, read from /proc (Linux).

A latency figure on a shared 2-core machine says as much about the machine as about
herald; the CPU each process spent per event says where the time went, and compares
across days when rates do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Process groups: a name, and a piece of the command line that puts a process in it.
# The bench's own process (its publishers, and the worker when it runs in-process)
# is a group of its own, `BENCH`.
GROUPS = (
    ("herald worker", "supervisor.py worker"),
    ("fake APNs", "bench.apns_server"),
    ("RabbitMQ", "beam.smp"),
    ("PostgreSQL", "postgres"),
)
BENCH = "bench process"
PROC = Path("/proc")
# Groups that spent less than this per event are left out of a report (ms).
NEGLIGIBLE_MS = 0.005


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds spent so far by each group, and the machine's busy and total time."""

    by_group: dict[str, float]
    machine_busy: float
    machine_total: float


def snapshot() -> Snapshot | None:
    """Now's snapshot, or None where there is no /proc."""
    if not (PROC / "stat").exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    by_group: dict[str, float] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            # Fields after the command's closing parenthesis: utime and stime are the
            # 12th and 13th of them.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        group = BENCH if int(entry.name) == me else next(
            (name for name, needle in GROUPS if needle in command), None)
        if group is not None:
            by_group[group] = by_group.get(group, 0.0) + (
                int(fields[11]) + int(fields[12])) / ticks
    cpu = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = cpu[3] + cpu[4]  # idle and iowait
    return Snapshot(by_group, (sum(cpu) - idle) / ticks, sum(cpu) / ticks)


def per_event(before: Snapshot | None, after: Snapshot | None,
              events: int) -> tuple[dict[str, float], float | None]:
    """({group: CPU ms per event}, the machine's busy share) between two snapshots."""
    if before is None or after is None or events <= 0:
        return {}, None
    spent = {group: (seconds - before.by_group.get(group, 0.0)) * 1000 / events
             for group, seconds in after.by_group.items()}
    spent = {group: ms for group, ms in spent.items() if ms >= NEGLIGIBLE_MS}
    total = after.machine_total - before.machine_total
    busy = (after.machine_busy - before.machine_busy) / total if total > 0 else None
    return dict(sorted(spent.items(), key=lambda kv: -kv[1])), busy
