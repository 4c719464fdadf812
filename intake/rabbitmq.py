"""Dramatiq's RabbitMQ broker, with acks that travel in groups.

Dramatiq's RabbitMQ consumer acks each message by waking its consumer thread (pika's
connection belongs to that thread) with a callback of its own, so every message costs
the worker a thread wake-up and a socket write for its ack alone. Here, acks that
finish while a wake-up is already on its way ride along with it: under load, one
wake-up and one write carry many acks; when idle, each ack still goes at once.
"""

from __future__ import annotations

import threading
from typing import Any

import pika.exceptions
from dramatiq.brokers import rabbitmq
from dramatiq.errors import ConnectionClosed


class RabbitmqBroker(rabbitmq.RabbitmqBroker):
    """Dramatiq's `RabbitmqBroker` whose consumers group their acks (see the module).

    Takes the same parameters as Dramatiq's.
    """

    @property
    def consumer_class(self) -> type[rabbitmq._RabbitmqConsumer]:
        return _GroupedAckConsumer


class _GroupedAckConsumer(rabbitmq._RabbitmqConsumer):
    """A queue's consumer; `ack` runs on worker threads, `_send_acks` on the consumer's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        # Delivery tags to ack on the next wake-up of the consumer thread.
        self._pending: list[int] = []

    def ack(self, message: Any) -> None:
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
