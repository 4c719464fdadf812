"""Dramatiq's RabbitMQ broker, with acks that travel in groups and publishes that give
up when RabbitMQ blocks them.

Dramatiq's RabbitMQ consumer acks each message by waking its consumer thread (pika's
connection belongs to that thread) with a callback of its own, so every message costs
the worker a thread wake-up and a socket write for its ack alone. Here, acks that
finish while a wake-up is already on its way ride along with it: under load, one
wake-up and one write carry many acks; when idle, each ack still goes at once.

When RabbitMQ runs short of memory or disk (a resource alarm) it stops reading from
every connection that publishes (`connection.blocked`) until the alarm clears, and a
publish waiting for its confirm would wait that long. Here every connection has pika's
`blocked_connection_timeout` (unless its parameters set one): a connection blocked for
longer is closed, and the publish raises `PublishBlocked` instead of being tried again
on new connections that RabbitMQ would block too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import pika.exceptions
from dramatiq.brokers import rabbitmq
from dramatiq.errors import ConnectionClosed

# Seconds a publish waits on a connection RabbitMQ has blocked before it fails: long
# enough to ride out a brief alarm, short enough not to hold a request thread for long.
BLOCKED_CONNECTION_TIMEOUT = 10.0
# Seconds the broker counts as blocked after a publish gave up on a blocked connection
# (unless one succeeds sooner): enough for a health probe to see it, while an idle
# process, whose publishes cannot tell it the alarm is over, stops saying so soon.
BLOCKED_REPORT_SECONDS = 30.0


class PublishBlocked(ConnectionClosed):
    """RabbitMQ kept a publishing connection blocked (a memory or disk alarm) for
    longer than its `blocked_connection_timeout`.

    The message may still reach its queue: RabbitMQ reads what the connection had sent
    once the alarm clears. A caller that publishes again may therefore queue it twice.
    """


class RabbitmqBroker(rabbitmq.RabbitmqBroker):
    """Dramatiq's `RabbitmqBroker` whose consumers group their acks and whose publishes
    give up on a blocked connection (see the module).

    Parameters:
      blocked_timeout: seconds a publish waits on a connection RabbitMQ has blocked, for
        connection parameters that set no `blocked_connection_timeout` of their own
        (a `BROKER_URL`'s `?blocked_connection_timeout=N` wins).
      **kwargs: Dramatiq's parameters (`url`, `confirm_delivery`, `middleware`, ...).
    """

    def __init__(self, *, blocked_timeout: float = BLOCKED_CONNECTION_TIMEOUT,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        parameters = self.parameters if isinstance(self.parameters, list) \
            else [self.parameters]
        for each in parameters:
            if each.blocked_connection_timeout is None:  # pika's default: wait forever
                each.blocked_connection_timeout = blocked_timeout
        # When a publish last gave up on a blocked connection (time.monotonic()), until
        # a publish succeeds.
        self._blocked_at: float | None = None

    @property
    def consumer_class(self) -> type[rabbitmq._RabbitmqConsumer]:
        return _GroupedAckConsumer

    @property
    def channel(self) -> Any:
        """This thread's channel, whose `basic_publish` raises `PublishBlocked` when
        RabbitMQ blocked its connection for too long."""
        return _PublishingChannel(self, super().channel)

    @channel.deleter
    def channel(self) -> None:
        # Dramatiq's own deleter (mypy reads a property with a deleter as overloads).
        rabbitmq.RabbitmqBroker.channel.fdel(self)  # type: ignore[attr-defined]

    @property
    def publishing_blocked(self) -> bool:
        """True while RabbitMQ is known to block publishing: a publish gave up on a
        blocked connection less than `BLOCKED_REPORT_SECONDS` ago, and none succeeded
        since. Connections that only consume or sit idle are never blocked, so there
        is no cheaper way to know."""
        blocked_at = self._blocked_at
        return blocked_at is not None and time.monotonic() - blocked_at < BLOCKED_REPORT_SECONDS

    def enqueue(self, message: dramatiq.Message[Any], *,
                delay: int | None = None) -> dramatiq.Message[Any]:
        """Dramatiq's enqueue; raises `PublishBlocked` (without trying again) when
        RabbitMQ blocked the connection for longer than its timeout."""
        sent = super().enqueue(message, delay=delay)
        self._blocked_at = None  # RabbitMQ takes publishes again
        return sent

    def _gave_up_blocked(self) -> PublishBlocked:
        """Note that a publish gave up on a blocked connection and drop that connection
        (pika has closed it), so this thread's next publish connects anew."""
        self._blocked_at = time.monotonic()
        del self.connection
        return PublishBlocked("RabbitMQ blocked publishing (a memory or disk alarm) for "
                              "longer than the connection's blocked_connection_timeout")


class _PublishingChannel:
    """A channel of `RabbitmqBroker` (see `RabbitmqBroker.channel`); all but
    `basic_publish` is the pika channel's own.

    Parameters:
      broker: the broker whose thread-local channel this is.
      channel: pika's `BlockingChannel`.

    Dramatiq's enqueue tries a publish again on a new connection after any connection
    error, six times in all; after a blocked timeout each new connection would be
    blocked again, so `PublishBlocked`, which is not a pika error, ends it at once.
    """

    def __init__(self, broker: RabbitmqBroker, channel: Any) -> None:
        self._broker = broker
        self._channel = channel

    def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._channel.basic_publish(*args, **kwargs)
        except pika.exceptions.ConnectionBlockedTimeout:
            raise self._broker._gave_up_blocked() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class _GroupedAckConsumer(rabbitmq._RabbitmqConsumer):
    """A queue's consumer; `ack` runs on worker threads, `_send_acks` on the consumer's.

    After a lost connection Dramatiq's consumer thread makes a new consumer and acks
    every message through it, those delivered on the lost connection included. Delivery
    tags start again at 1 on each channel, so such an ack would settle whichever new
    delivery now has that tag, while its work may still be under way. Each message
    therefore remembers the consumer that delivered it, and acks and nacks of messages
    from another one are dropped: RabbitMQ has delivered those again already.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        # Delivery tags to ack on the next wake-up of the consumer thread.
        self._pending: list[int] = []

    def __next__(self) -> Any:
        message = super().__next__()
        if message is not None:
            message._delivered_by = self
        return message

    def _delivered_elsewhere(self, message: Any, what: str) -> bool:
        if getattr(message, "_delivered_by", None) is self:
            return False
        self.logger.info("Not %s message %s: it came on a connection since lost, and "
                         "RabbitMQ delivers it again.", what, message.message_id)
        return True

    def nack(self, message: Any) -> None:
        if not self._delivered_elsewhere(message, "nacking"):
            super().nack(message)

    def ack(self, message: Any) -> None:
        if self._delivered_elsewhere(message, "acking"):
            return
        try:
            self.known_tags.remove(message._tag)
        except KeyError:
            self.logger.warning("Failed to ack message: not in known tags.")
            return
        with self._lock:
            self._pending.append(message._tag)
            if len(self._pending) > 1:
                return  # the wake-up already asked for carries this ack too
        try:
            self.connection.add_callback_threadsafe(self._send_acks)
        except Exception as e:
            # No wake-up will come for the queued tags: forget them (their messages are
            # redelivered once this connection is gone), or no later ack would ask for
            # a wake-up again.
            with self._lock:
                self._pending.clear()
            if isinstance(e, pika.exceptions.AMQPConnectionError
                          | pika.exceptions.AMQPChannelError):
                raise ConnectionClosed(e) from None
            self.logger.warning("Failed to ack message.", exc_info=True)

    def _take_pending(self) -> list[int]:
        with self._lock:
            tags, self._pending = self._pending, []
        return tags

    def _send_acks(self) -> None:
        for tag in self._take_pending():
            self.channel.basic_ack(tag)
