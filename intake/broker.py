"""The Dramatiq broker: RabbitMQ when `BROKER_URL` is set, else in-process."""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import ShutdownNotifications

from intake.logs import redact_dramatiq_logs
from intake.middleware import IntakeMetrics, RetryWithBackoff
from intake.rabbitmq import RabbitmqBroker
from settings import Settings

logger = logging.getLogger("herald.intake")


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker and make it Dramatiq's global one.

    RabbitMQ: durable queues, persistent messages, publisher confirms (an enqueue
    returns only once RabbitMQ has the message on disk), per-queue dead-letter
    queues (`<queue>.XQ`) and acks sent in groups under load (`intake.rabbitmq`).
    In-process: Dramatiq's stub broker, consumed by a worker in the same process; a
    202 then means "queued in memory".
    """
    redact_dramatiq_logs()
    middleware = [
        ShutdownNotifications(),
        IntakeMetrics(),
        RetryWithBackoff(
            min_backoff_ms=settings.RETRY_MIN_BACKOFF_MS,
            max_backoff_ms=settings.RETRY_MAX_BACKOFF_MS,
            max_tries=settings.RETRY_MAX_TRIES,
        ),
    ]
    broker: dramatiq.Broker
    if settings.BROKER_URL:
        broker = RabbitmqBroker(
            url=settings.BROKER_URL, confirm_delivery=True, middleware=middleware
        )
    else:
        broker = StubBroker(middleware=middleware)
        broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    return broker


def ping(broker: dramatiq.Broker) -> None:
    """Raise if the broker cannot be reached."""
    # Opening (or reusing) this thread's channel proves the connection works.
    if isinstance(broker, RabbitmqBroker) and not broker.channel.is_open:
        raise ConnectionError("RabbitMQ channel is closed")
