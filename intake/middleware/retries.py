"""Retries with exponential backoff, jitter, `Retry-After` floors and a bounded budget;
then the dead-letter store.

This replaces Dramatiq's own `Retries` middleware: herald needs the provider's
`Retry-After` as a floor, a permanent-failure path that skips retries, and a durable
dead-letter row with the reason for every message it gives up on.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, q_name
from dramatiq.middleware import Middleware

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from intake import dead_letters
from metrics import EVENTS_FAILED, EVENTS_RETRIED

logger = logging.getLogger("herald.intake.retries")


class InvalidMessage(Exception):
    """A queue message herald cannot understand; retrying will not help."""


class RetryWithBackoff(Middleware):
    """Decides what happens to a queue message whose work raised.

    Parameters:
      min_backoff_ms: delay before the first retry; doubles with each try.
      max_backoff_ms: cap on the delay.
      max_tries: tries in all (the first one included) before the dead-letter store.

    Outcomes: `PermanentDeliveryError` or `InvalidMessage` → dead letter now;
    anything else → retry after `compute_backoff` (jittered, at least the error's
    `retry_after`), until `max_tries`, then dead letter. The retry is enqueued before
    the original is acked, so a crash in between repeats work rather than losing it.
    """

    def __init__(self, *, min_backoff_ms: int, max_backoff_ms: int, max_tries: int) -> None:
        self.min_backoff_ms = min_backoff_ms
        self.max_backoff_ms = max_backoff_ms
        self.max_tries = max_tries

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        queue = q_name(message.queue_name)
        tries = int(message.options.get("retries", 0)) + 1
        reason = _reason(exception)
        permanent = isinstance(exception, PermanentDeliveryError | InvalidMessage)
        if permanent or tries >= self.max_tries:
            why = reason if permanent else f"gave up after {tries} tries: {reason}"
            self._dead_letter(message, queue, why, tries)
            return
        _, delay = compute_backoff(
            tries - 1, factor=self.min_backoff_ms, max_backoff=self.max_backoff_ms
        )
        retry_after = getattr(exception, "retry_after", None)
        if retry_after:
            delay = max(delay, int(float(retry_after) * 1000))
        message.options["retries"] = tries
        message.options["last_error"] = reason[:500]
        logger.info("retrying %s on %s in %d ms (try %d): %s", message.message_id, queue, delay,
                    tries + 1, reason[:200])
        EVENTS_RETRIED.labels(queue).inc()
        broker.enqueue(message, delay=delay)  # type: ignore[arg-type]  # a proxy, as in Retries

    def _dead_letter(
        self, message: MessageProxy, queue: str, reason: str, tries: int
    ) -> None:
        EVENTS_FAILED.labels(queue).inc()
        payload = {"queue": queue, "actor": message.actor_name, "args": list(message.args),
                   "kwargs": dict(message.kwargs)}
        event = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
        user_id = event.get("user_id") if isinstance(event.get("user_id"), int) else None
        try:
            dead_letters.record(
                kind=dead_letters.KIND_QUEUE_MESSAGE,
                queue=queue,
                reason=reason,
                payload=payload,
                attempts=tries,
                user_id=user_id,
            )
        except Exception:
            # The database is unreachable: the broker's own dead-letter queue (.XQ)
            # still holds the message, so it is not lost.
            logger.exception("could not store dead letter for %s", message.message_id)
        message.fail()


def _reason(exception: BaseException) -> str:
    if isinstance(exception, TransientDeliveryError | PermanentDeliveryError):
        return exception.reason
    text = str(exception)
    return f"{type(exception).__name__}: {text}" if text else type(exception).__name__
