"""Keeps queue payloads out of Dramatiq's own log lines.

Dramatiq's worker logs a message that failed as `actor(args...)`, which would put
message text, names and device tokens in the logs. herald's logs carry none of those,
so such lines name the message by its actor and id instead.
"""

from __future__ import annotations

import logging

from dramatiq import Message
from dramatiq.broker import MessageProxy

# Dramatiq's loggers that format whole messages into their lines.
DRAMATIQ_LOGGERS = ("dramatiq.worker.WorkerThread",)


class RedactMessages(logging.Filter):
    """Replaces each Dramatiq message among a record's arguments by `actor#message_id`.

    Runs on whichever thread logs the record, before any handler formats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, Message | MessageProxy) for arg in record.args
        ):
            record.args = tuple(
                f"{arg.actor_name}#{arg.message_id}"
                if isinstance(arg, Message | MessageProxy) else arg
                for arg in record.args
            )
        return True


def redact_dramatiq_logs() -> None:
    """Install `RedactMessages` on Dramatiq's loggers (once per process)."""
    for name in DRAMATIQ_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactMessages) for f in logger.filters):
            logger.addFilter(RedactMessages())
