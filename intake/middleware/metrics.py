"""Counts every queue message's fate by queue name."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from metrics import EVENTS_PROCESSED


class IntakeMetrics(Middleware):
    """Counts messages processed per queue (retries and failures are counted where decided)."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            EVENTS_PROCESSED.labels(q_name(message.queue_name)).inc()
