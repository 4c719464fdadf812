"""Queue and Dramatiq actor names; operators watch the queues, so the names are contract."""

from __future__ import annotations

# The one queue for email events (and internal batch commands).
EMAIL_QUEUE = "email"
# Dramatiq actor consuming EMAIL_QUEUE.
EMAIL_ACTOR = "email"


def push_queue(shard: int) -> str:
    """Queue of push shard `shard`."""
    return f"push.shard{shard}"


def push_actor(shard: int) -> str:
    """Dramatiq actor consuming `push_queue(shard)` (actor names allow no dots)."""
    return f"push_shard{shard}"


def shard_of(user_id: int, shards: int) -> int:
    """The shard that owns `user_id`: one user's events stay on one queue, in order."""
    return user_id % shards


def all_queues(shards: int) -> list[str]:
    return [push_queue(n) for n in range(shards)] + [EMAIL_QUEUE]
