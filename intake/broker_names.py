"""Dramatiq's own queue-name conventions (delay queues end in `.DQ`, dead ones in `.XQ`)."""

from __future__ import annotations

from dramatiq.common import q_name


def canonical_queue(queue_name: str) -> str:
    """`push.shard0.DQ` → `push.shard0`."""
    return q_name(queue_name)
