"""The dead-letter store: work herald gave up on, why, and how to send it again."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dramatiq

from metrics import DEAD_LETTERS
from models import DeadLetter, db

logger = logging.getLogger("herald.dead_letters")

# Dead letter kinds: a queue message (push or email event) and an email batch.
KIND_QUEUE_MESSAGE = "queue_message"
KIND_EMAIL_BATCH = "email_batch"
KIND_PUSH_DEVICE = "push_device"
# A queue message the embedded default still held in memory when it stopped: not given
# up on (not counted or logged as a dead letter), and queued again at the next start.
KIND_KEPT_AT_STOP = "kept_at_stop"


def record(
    *,
    kind: str,
    reason: str,
    payload: dict[str, Any],
    queue: str | None = None,
    attempts: int = 0,
    user_id: int | None = None,
) -> int:
    """Store one dead letter durably and return its id.

    Inside a caller's transaction, the letter is counted and logged only once that
    transaction commits: one rolled back (and asked again later) would otherwise
    count, and alert on, a letter that was never stored.
    """
    with db.atomic():
        row = DeadLetter.create(
            kind=kind,
            queue=queue,
            reason=reason[:2000],
            payload=json.dumps(payload, sort_keys=True),
            attempts=attempts,
            user_id=user_id,
        )
        letter_id = int(row.id)
        db.after_commit(lambda: _announce(letter_id, kind, queue, attempts, reason))
    return letter_id


def record_queue_message(*, queue: str, actor: str, args: Sequence[Any],
                         kwargs: Mapping[str, Any], reason: str, attempts: int,
                         kind: str = KIND_QUEUE_MESSAGE) -> int:
    """Store a queue message's events (`args`) as a letter whose work `queue_message`
    rebuilds; the letter names the user of a single event."""
    event = args[0] if args and isinstance(args[0], dict) else {}
    user_id = event.get("user_id") if isinstance(event.get("user_id"), int) else None
    return record(kind=kind, queue=queue, reason=reason, attempts=attempts, user_id=user_id,
                  payload={"queue": queue, "actor": actor, "args": list(args),
                           "kwargs": dict(kwargs)})


def queue_message(payload: Mapping[str, Any], **options: Any) -> dramatiq.Message[Any]:
    """The queue message a `record_queue_message` letter holds, to enqueue again."""
    return dramatiq.Message(queue_name=payload["queue"], actor_name=payload["actor"],
                            args=tuple(payload["args"]), kwargs=payload.get("kwargs", {}),
                            options=options)


def _announce(letter_id: int, kind: str, queue: str | None, attempts: int,
              reason: str) -> None:
    if kind == KIND_KEPT_AT_STOP:  # kept for the next start, not given up on
        logger.info("kept %s: queue=%s", letter_id, queue)
        return
    DEAD_LETTERS.labels(kind).inc()
    logger.warning(
        "dead letter %s: kind=%s queue=%s attempts=%s reason=%s",
        letter_id,
        kind,
        queue,
        attempts,
        reason[:300],
    )


def list_dead_letters(*, limit: int = 100, include_replayed: bool = False) -> list[DeadLetter]:
    query = DeadLetter.select().order_by(DeadLetter.id.desc()).limit(limit)
    if not include_replayed:
        query = query.where(DeadLetter.replayed_at.is_null())
    return list(query)


def get_dead_letter(letter_id: int) -> DeadLetter | None:
    return DeadLetter.get_or_none(DeadLetter.id == letter_id)

