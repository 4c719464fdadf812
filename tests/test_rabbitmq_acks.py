"""herald's RabbitMQ broker sends acks in groups: every message is still acked exactly
once, and none comes back after the worker goes. Real RabbitMQ, a vhost per test."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed

from intake.rabbitmq import RabbitmqBroker, _GroupedAckConsumer
from tests.harness import rabbit_queue_depth, rabbit_vhost, wait_until

pytestmark = pytest.mark.rabbitmq

MESSAGES = 300
QUEUE = "acks"


class _CountingConsumer(_GroupedAckConsumer):
    """Counts the consumer thread's wake-ups for acks, and the acks they carried."""

    wakeups = 0
    acked = 0

    def _take_pending(self) -> list[int]:
        tags = super()._take_pending()
        type(self).wakeups += 1
        type(self).acked += len(tags)
        return tags


class _CountingBroker(RabbitmqBroker):
    @property
    def consumer_class(self) -> type[Any]:
        return _CountingConsumer


def _run(url: str, broker_class: type[RabbitmqBroker], seen: Counter[int],
         expected: int) -> None:
    """Consume the queue with one worker until `expected` calls ran, then stop it."""
    broker = broker_class(url=url, confirm_delivery=True)
    lock = threading.Lock()

    def work(n: int) -> None:
        time.sleep(0.002)  # long enough for many to finish while the consumer is busy
        with lock:
            seen[n] += 1

    actor = dramatiq.actor(broker=broker, actor_name="work", queue_name=QUEUE,
                           max_retries=0)(work)
    for n in range(MESSAGES if expected else 0):
        actor.send(n)
    worker = dramatiq.Worker(broker, worker_threads=32, worker_timeout=100)
    worker.start()
    try:
        if expected:
            wait_until(lambda: sum(seen.values()) >= expected, timeout=60,
                       what=f"{expected} messages processed")
        else:
            time.sleep(1.0)  # anything left unacked would be redelivered meanwhile
    finally:
        worker.stop(timeout=10_000)
        broker.close()


def test_every_message_is_acked_once_and_acks_share_wakeups() -> None:
    _CountingConsumer.wakeups = _CountingConsumer.acked = 0
    with rabbit_vhost() as url:
        seen: Counter[int] = Counter()
        _run(url, _CountingBroker, seen, MESSAGES)
        # The worker has closed its connection: an unacked message would be ready again.
        assert rabbit_queue_depth(url, QUEUE) == 0
        assert sorted(seen) == list(range(MESSAGES))
        assert set(seen.values()) == {1}
        assert _CountingConsumer.acked == MESSAGES
        assert _CountingConsumer.wakeups < MESSAGES, "acks finishing together share a wake-up"

        # A second worker on the same queue gets nothing to do again.
        again: Counter[int] = Counter()
        _run(url, RabbitmqBroker, again, 0)
        assert again == Counter()


def test_an_ack_on_a_closed_connection_fails_without_blocking_later_acks() -> None:
    with rabbit_vhost() as url:
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
        try:
            broker.declare_queue(QUEUE)
            for n in range(2):
                broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="work",
                                                args=(n,), kwargs={}, options={}))
            first = broker.consume(QUEUE, prefetch=1, timeout=1000)
            assert isinstance(first, _GroupedAckConsumer)
            message = wait_until(lambda: next(first), what="a delivery")
            first.connection.close()
            with pytest.raises(ConnectionClosed):
                first.ack(message)
            assert first._take_pending() == [], "nothing left waiting for a wake-up"

            # Unacked on a closed connection: both messages are delivered again, and
            # acks on a live consumer go through.
            second = broker.consume(QUEUE, prefetch=2, timeout=1000)
            got = [wait_until(lambda: next(second), what="a redelivery") for _ in range(2)]
            assert sorted(m.args[0] for m in got) == [0, 1]
            for m in got:
                second.ack(m)
            second.close()
            assert rabbit_queue_depth(url, QUEUE) == 0
        finally:
            broker.close()


def test_an_ack_for_a_delivery_on_a_lost_connection_does_not_settle_a_newer_one() -> None:
    """Delivery tags start again on a new channel: the late ack of a message delivered
    on the lost connection must not ack the new delivery that now has its tag."""
    with rabbit_vhost() as url:
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
        try:
            broker.declare_queue(QUEUE)
            broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="work",
                                            args=("a",), kwargs={}, options={}))
            first = broker.consume(QUEUE, prefetch=1, timeout=1000)
            assert isinstance(first, _GroupedAckConsumer)
            a = wait_until(lambda: next(first), what="a delivery")
            first.connection.close()  # lost while "a" is being worked on

            # The consumer thread's new consumer: "a" delivered again, with the same tag.
            second = broker.consume(QUEUE, prefetch=1, timeout=1000)
            a_again = wait_until(lambda: next(second), what="the redelivery")
            assert (a._tag, a_again._tag) == (1, 1)
            second.ack(a)  # the work on the first delivery ends: its late ack
            second.close()  # sends what acks it holds, then closes
            # The delivery on the new channel was never acked: it is queued again.
            assert rabbit_queue_depth(url, QUEUE) == 1

            third = broker.consume(QUEUE, prefetch=1, timeout=1000)
            third.ack(wait_until(lambda: next(third), what="the message once more"))
            third.close()
            assert rabbit_queue_depth(url, QUEUE) == 0
        finally:
            broker.close()
