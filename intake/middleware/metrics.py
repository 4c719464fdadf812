"""Counts every queue event's fate by queue name, the messages in progress, how long each
message waited in its queue, and how old each message was when its work ended."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from intake.middleware.retries import EventsFailed, event_count
from metrics import EVENT_AGE, EVENTS_PROCESSED, MESSAGES_IN_PROGRESS, QUEUE_WAIT


class IntakeMetrics(Middleware):
    """Counts events processed per queue (retries and failures are counted where decided),
    the messages being worked on (`herald_messages_in_progress`: when it stays near
    `WORKER_THREADS`, messages wait in the queue for a thread), and observes how long
    each message waited before its first try began (`herald_queue_wait_seconds`) and
    each finished message's age (`herald_event_age_seconds`).

    A message may carry several events; each counts, and when some of them failed
    (`EventsFailed`) the others still count as processed. The age runs from the
    message's first publish (a retry keeps its message's timestamp) to the end of the
    work that finished it: for a push, the providers' answers recorded.
    """

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        queue = q_name(message.queue_name)
        MESSAGES_IN_PROGRESS.labels(queue).inc()
        if "retries" not in message.options:
            # A retry keeps its first publish's timestamp: its wait would count the
            # backoff, which the age already shows.
            wait = time.time() - message.message_timestamp / 1000
            QUEUE_WAIT.labels(queue).observe(max(0.0, wait))

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        MESSAGES_IN_PROGRESS.labels(q_name(message.queue_name)).dec()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        queue = q_name(message.queue_name)
        MESSAGES_IN_PROGRESS.labels(queue).dec()
        if exception is None:
            done = event_count(message)
        elif isinstance(exception, EventsFailed):
            done = event_count(message) - len(exception.failures)
        else:
            return
        if done > 0:
            age = time.time() - message.message_timestamp / 1000
            EVENT_AGE.labels(queue).observe(max(0.0, age))
            # Last: a reader that waits for this count finds the rest already there.
            EVENTS_PROCESSED.labels(queue).inc(done)
