"""The Dramatiq broker: RabbitMQ when `BROKER_URL` is set, else in-process."""

from __future__ import annotations

import logging

import dramatiq
import pika.exceptions
from dramatiq.middleware import ShutdownNotifications

from intake.logs import redact_dramatiq_logs
from intake.memory import InMemoryBroker
from intake.middleware import IntakeMetrics, RetryWithBackoff
from intake.rabbitmq import PublishBlocked, RabbitmqBroker
from settings import Settings

logger = logging.getLogger("herald.intake")


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker and make it Dramatiq's global one.

    RabbitMQ: durable queues, persistent messages, publisher confirms (an enqueue
    returns only once RabbitMQ has the message on disk), per-queue dead-letter
    queues (`<queue>.XQ`) and acks sent in groups under load (`intake.rabbitmq`).
    A publish that RabbitMQ blocks (a memory or disk alarm) raises `PublishBlocked`
    after `BLOCKED_CONNECTION_TIMEOUT` seconds, or the `blocked_connection_timeout`
    that `BROKER_URL` gives, instead of waiting for the alarm to end.
    In-process: Dramatiq's stub broker, consumed by a worker in the same process; a
    202 then means "queued in memory", and a graceful stop keeps what is still queued
    for the next start (`intake.memory`).
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
        broker = InMemoryBroker(middleware=middleware)
        broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    return broker


# What a lost or refused RabbitMQ connection raises (pika wraps socket errors).
_CONNECTION_LOST = (pika.exceptions.AMQPError, OSError)


def ping(broker: dramatiq.Broker) -> None:
    """Raise if the broker cannot be reached; publishes nothing.

    RabbitMQ: this thread's connection (Dramatiq keeps one per thread) reads what is
    waiting on its socket without waiting for more. A connection the broker closed
    (a shutdown, a restart) raises there, where its cached `is_open` would still say
    yes. Such a connection may also have died while the broker is back up (a restart,
    a missed heartbeat), so it is replaced once, and only a new connection that fails
    too says the broker is down.

    A broker that blocks publishing (a memory or disk alarm) answers reads as usual, so
    it counts as down while `RabbitmqBroker.publishing_blocked` says so.
    """
    if not isinstance(broker, RabbitmqBroker):
        return  # in-process: always there
    if broker.publishing_blocked:
        raise PublishBlocked("RabbitMQ is blocking publishing (a memory or disk alarm)")
    try:
        _read_pending(broker)
    except _CONNECTION_LOST:
        del broker.connection  # this thread's, and its channel
        _read_pending(broker)


def _read_pending(broker: RabbitmqBroker) -> None:
    channel = broker.channel  # connects, on this thread's first use or after a loss
    if not channel.is_open:
        raise ConnectionError("RabbitMQ channel is closed")
    # A zero time limit handles what has arrived (a close from the broker, the end of
    # the stream, heartbeats due) and returns at once.
    broker.connection.process_data_events(time_limit=0)
