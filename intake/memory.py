"""The embedded default's in-process queue, kept across a graceful stop.

Dramatiq's stub broker holds queue messages in memory, and its consumers drop the
messages a worker had prefetched or was holding for a later retry when the worker
stops. Here they go back to their queues instead, and what is left once the worker
has stopped is written to the database (`keep`); the next start queues it again
(`requeue_kept`) before its worker consumes. A graceful stop (SIGTERM) therefore loses
nothing that was accepted; only a crash loses what was still in memory.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.brokers import stub
from dramatiq.common import q_name

from intake import dead_letters
from models import DeadLetter, db

logger = logging.getLogger("herald.intake.memory")

# Why a kept message is in the dead-letter store, as `dead-letters list` shows it.
KEPT_REASON = "queued in memory when herald stopped; queued again at its next start"


class InMemoryBroker(stub.StubBroker):
    """Dramatiq's `StubBroker` whose consumers hand unfinished messages back to their
    queues when the worker stops, so that `keep` finds them.

    Takes the same parameters as Dramatiq's.
    """

    def consume(self, queue_name: str, prefetch: int = 1,
                timeout: int = 100) -> stub._StubConsumer:
        try:
            return _RequeueingConsumer(self.queues[queue_name], self.dead_letters_by_queue[
                queue_name], prefetch, timeout)
        except KeyError:
            raise dramatiq.QueueNotFound(queue_name) from None

    def take_all(self) -> list[dramatiq.Message[Any]]:
        """Empty every queue (retries waiting included) and return what was there.
        Call it once the worker has stopped."""
        taken = []
        for name in sorted(self.queues):
            waiting = self.queues[name]
            while True:
                try:
                    taken.append(dramatiq.Message.decode(waiting.get_nowait()))
                except queue.Empty:
                    break
        return taken


class _RequeueingConsumer(stub._StubConsumer):
    """Runs on a Dramatiq consumer thread; `requeue` runs as the worker stops."""

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        for message in messages:
            self.queue.put(message._message.encode())


def keep(broker: InMemoryBroker) -> int:
    """Store every message left in `broker`'s queues, in one transaction; return how
    many. Runs on the stopping thread, after the worker and the actors stopped."""
    messages = broker.take_all()
    if not messages:
        return 0
    with db.connection_context(), db.atomic():
        for message in messages:
            dead_letters.record_queue_message(
                kind=dead_letters.KIND_KEPT_AT_STOP, queue=q_name(message.queue_name),
                actor=message.actor_name, args=message.args, kwargs=message.kwargs,
                reason=KEPT_REASON, attempts=int(message.options.get("retries", 0)))
    logger.info("kept %d queue message(s) that were still in memory", len(messages))
    return len(messages)


def requeue_kept(broker: dramatiq.Broker) -> int:
    """Queue again, oldest first, what earlier stops kept; return how many. Runs at
    start, before the worker consumes; each letter is marked replayed as it goes.

    A letter for a queue this process does not have (`PUSH_SHARDS` lowered since) is
    left where it is, with a warning, rather than failing the start: its events stay
    listed there.
    """
    queued = 0
    declared = broker.get_declared_queues()
    with db.connection_context():
        rows = list(DeadLetter.select().where(
            (DeadLetter.kind == dead_letters.KIND_KEPT_AT_STOP)
            & DeadLetter.replayed_at.is_null()
        ).order_by(DeadLetter.id))
        for row in rows:
            payload = json.loads(row.payload)
            if payload["queue"] not in declared:
                logger.warning("kept letter %s is for queue %s, which this process does "
                               "not have (was PUSH_SHARDS lowered?): left in the "
                               "dead-letter store", row.id, payload["queue"])
                continue
            # A retry that was waiting keeps the tries it had used.
            options = {"retries": row.attempts} if row.attempts else {}
            broker.enqueue(dead_letters.queue_message(payload, **options))
            DeadLetter.update(replayed_at=time.time()).where(DeadLetter.id == row.id).execute()
            queued += 1
    if queued:
        logger.info("queued again %d message(s) kept at the last stop", queued)
    return queued
