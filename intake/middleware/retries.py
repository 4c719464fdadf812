"""Retries with exponential backoff, jitter, `Retry-After` floors and a bounded budget;
then the dead-letter store.

This replaces Dramatiq's own `Retries` middleware: herald needs the provider's
`Retry-After` as a floor, a permanent-failure path that skips retries, and a durable
dead-letter row with the reason for every message it gives up on.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, q_name
from dramatiq.middleware import Middleware

from delivery.outcomes import PermanentDeliveryError, TransientDeliveryError
from intake import dead_letters
from metrics import EVENTS_FAILED, EVENTS_RETRIED
from models import in_call_connection

logger = logging.getLogger("herald.intake.retries")


class InvalidMessage(Exception):
    """A queue message herald cannot understand; retrying will not help."""


class EventsFailed(Exception):
    """Some events of a message that carries several failed; the rest are done.

    Parameters:
      failures: (payload, exception) for each failed event, in the message's order.

    The retry middleware retries only these events (in one message, in this order) and
    dead-letters each one that is permanent or out of tries on its own.
    """

    def __init__(self, failures: list[tuple[Any, BaseException]]) -> None:
        super().__init__(f"{len(failures)} event(s) failed: "
                         + "; ".join(sorted({_reason(exc) for _, exc in failures})))
        self.failures = failures


def event_count(message: MessageProxy) -> int:
    """Events a queue message carries: a list payload holds several, else one."""
    payload = message.args[0] if message.args else None
    return len(payload) if isinstance(payload, list) else 1


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
    A retry the broker will not take (a refused or unroutable publish, a connection
    that stays down) makes the events a dead letter instead, with both reasons; and
    where the dead-letter store cannot take them either, the message is nacked into
    the broker's dead queue (.XQ). Dramatiq acks whatever this middleware does not
    fail, so without this a refused retry would drop the events.
    `EventsFailed` applies the same rules to each failed event of a message carrying
    several: one retry message holds those to retry, and each event given up on is a
    dead letter of its own.
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
        if isinstance(exception, EventsFailed):
            self._split(broker, message, exception)
            return
        queue = q_name(message.queue_name)
        tries = int(message.options.get("retries", 0)) + 1
        reason = _reason(exception)
        if _permanent(exception) or tries >= self.max_tries:
            why = reason if _permanent(exception) else f"gave up after {tries} tries: {reason}"
            self._dead_letter(message, list(message.args), queue, why, tries,
                              event_count(message))
            message.fail()  # the broker's dead queue (.XQ) keeps a copy too
            return
        if not self._retry(broker, message, message, queue, tries, reason,
                           getattr(exception, "retry_after", None), event_count(message)):
            message.fail()

    def _split(self, broker: dramatiq.Broker, message: MessageProxy,
               failed: EventsFailed) -> None:
        """Retry the failed events of a multi-event message together; dead-letter, one
        by one, those that are permanent or out of tries. The message itself is acked:
        every event is now done, in the retry, or a dead letter."""
        queue = q_name(message.queue_name)
        tries = int(message.options.get("retries", 0)) + 1
        retry = []
        stored = True
        for payload, exc in failed.failures:
            if not _permanent(exc) and tries < self.max_tries:
                retry.append((payload, exc))
                continue
            why = _reason(exc) if _permanent(exc) else \
                f"gave up after {tries} tries: {_reason(exc)}"
            stored = self._dead_letter(message, [payload], queue, why, tries, 1) and stored
        if retry:
            payloads = [p for p, _ in retry]
            floors = [float(getattr(e, "retry_after", 0) or 0) for _, e in retry]
            again = message.copy(args=(payloads if len(payloads) > 1 else payloads[0],))
            stored = self._retry(broker, message, again, queue, tries,
                                 "; ".join(sorted({_reason(e) for _, e in retry})),
                                 max(floors) or None, len(payloads)) and stored
        if not stored:
            # Some dead letter could not be written: nack the whole message so the
            # broker's dead queue (.XQ) keeps it; the retried events may repeat, harmlessly.
            message.fail()

    def _retry(self, broker: dramatiq.Broker, message: MessageProxy, again: Any, queue: str,
               tries: int, reason: str, retry_after: float | None, events: int) -> bool:
        """Enqueue `again` (the events to retry) after the backoff. When the broker
        refuses it, store them as a dead letter instead. False when neither took them:
        the caller must then fail the message so the broker keeps it."""
        _, delay = compute_backoff(
            tries - 1, factor=self.min_backoff_ms, max_backoff=self.max_backoff_ms
        )
        if retry_after:
            delay = max(delay, int(float(retry_after) * 1000))
        again.options["retries"] = tries
        again.options["last_error"] = reason[:500]
        try:
            broker.enqueue(again, delay=delay)
        except Exception as exc:
            logger.error("could not queue the retry of %s (%d event(s)) on %s: %s",
                         message.message_id, events, queue, _reason(exc)[:200])
            return self._dead_letter(
                message, list(again.args), queue,
                f"retry could not be queued ({_reason(exc)}) after: {reason}", tries, events)
        logger.info("retrying %s (%d event(s)) on %s in %d ms (try %d): %s",
                    message.message_id, events, queue, delay, tries + 1, reason[:200])
        EVENTS_RETRIED.labels(queue).inc(events)
        return True

    def _dead_letter(self, message: MessageProxy, args: list[Any], queue: str, reason: str,
                     tries: int, events: int) -> bool:
        """Store a dead letter for `args` of `message`; False if the database refused."""
        EVENTS_FAILED.labels(queue).inc(events)
        try:
            # A worker thread's connection for this write only: one kept would outlive a
            # database restart and fail every later call on this thread.
            in_call_connection(functools.partial(
                dead_letters.record_queue_message,
                queue=queue, actor=message.actor_name, args=args,
                kwargs=message.kwargs, reason=reason, attempts=tries))
        except Exception:
            logger.exception("could not store dead letter for %s", message.message_id)
            return False
        return True


def _permanent(exception: BaseException) -> bool:
    return isinstance(exception, PermanentDeliveryError | InvalidMessage)


def _reason(exception: BaseException) -> str:
    if isinstance(exception, TransientDeliveryError | PermanentDeliveryError):
        return exception.reason
    text = str(exception)
    return f"{type(exception).__name__}: {text}" if text else type(exception).__name__
