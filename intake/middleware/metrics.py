"""Counts every queue event's fate by queue name."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from intake.middleware.retries import EventsFailed, event_count
from metrics import EVENTS_PROCESSED


class IntakeMetrics(Middleware):
    """Counts events processed per queue (retries and failures are counted where decided).

    A message may carry several events; each counts, and when some of them failed
    (`EventsFailed`) the others still count as processed.
    """

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            EVENTS_PROCESSED.labels(q_name(message.queue_name)).inc(event_count(message))
        elif isinstance(exception, EventsFailed):
            done = event_count(message) - len(exception.failures)
            if done > 0:
                EVENTS_PROCESSED.labels(q_name(message.queue_name)).inc(done)
