"""The dead-letter store: work herald gave up on, why, and how to send it again."""

from __future__ import annotations

import json
import logging
from typing import Any

from metrics import DEAD_LETTERS
from models import DeadLetter, db

logger = logging.getLogger("herald.dead_letters")

# Dead letter kinds: a queue message (push or email event) and an email batch.
KIND_QUEUE_MESSAGE = "queue_message"
KIND_EMAIL_BATCH = "email_batch"
KIND_PUSH_DEVICE = "push_device"


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


def _announce(letter_id: int, kind: str, queue: str | None, attempts: int,
              reason: str) -> None:
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

