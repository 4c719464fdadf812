"""Publishing events to the queues: which queues an event goes to, and the enqueue."""

from __future__ import annotations

from typing import Any

import dramatiq

from events import MessageDeletedEvent, MessageEvent, ReadEvent
from intake.queues import EMAIL_ACTOR, EMAIL_QUEUE, push_actor, push_queue, shard_of
from metrics import EVENTS_ACCEPTED

AnyEvent = MessageEvent | ReadEvent | MessageDeletedEvent

# The most events one push queue message carries: one request's events for a shard
# share a message (one publish, one confirm, one delivery and ack), while a failure
# narrows its retry to the events that failed.
PUSH_EVENTS_PER_MESSAGE = 100


class Publisher:
    """Turns events into queue messages.

    Parameters:
      broker: where to enqueue; with RabbitMQ and publisher confirms, `publish`
        returns only after the broker has confirmed every message.
      shards: `PUSH_SHARDS`.

    Fan-out: a message event goes to its user's push shard and/or the email queue as
    its channels say; `read` to both; `message_deleted` to every push shard (the
    users with pushes for it may live on any) and the email queue.

    Batching: the push events of one `publish` call that go to the same shard travel
    together, in order, as messages of up to `PUSH_EVENTS_PER_MESSAGE` events (a list
    payload; a lone event is its own object, as before). Email events stay one per
    message: the email consumers group their commits already.
    """

    def __init__(self, broker: dramatiq.Broker, shards: int) -> None:
        self.broker = broker
        self.shards = shards

    def routes(self, event: AnyEvent) -> list[tuple[str, str]]:
        """The (queue, actor) pairs `event` is published to."""
        email = (EMAIL_QUEUE, EMAIL_ACTOR)
        if isinstance(event, MessageEvent):
            out = []
            if "push" in event.channels:
                shard = shard_of(event.user_id, self.shards)
                out.append((push_queue(shard), push_actor(shard)))
            if "email" in event.channels:
                out.append(email)
            return out
        if isinstance(event, ReadEvent):
            shard = shard_of(event.user_id, self.shards)
            return [(push_queue(shard), push_actor(shard)), email]
        return [(push_queue(n), push_actor(n)) for n in range(self.shards)] + [email]

    def publish(self, events: list[AnyEvent]) -> int:
        """Enqueue every event on its queues; returns the number of queue messages.

        Raises what the broker raised when a publish fails. The messages published
        before it stay queued, so the caller must report the whole call as failed (the
        API answers 503) and its retry may queue those again, which the workers absorb.
        `herald_events_accepted_total` counts only the events whose publish returned.
        """
        sent = 0
        push: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for event in events:
            payload = event.model_dump(mode="json", exclude_none=True)
            for queue, actor in self.routes(event):
                if queue == EMAIL_QUEUE:
                    self._enqueue(queue, actor, payload, None)
                    EVENTS_ACCEPTED.labels(queue).inc()
                    sent += 1
                else:
                    push.setdefault((queue, actor), []).append(payload)
        for (queue, actor), payloads in push.items():
            for start in range(0, len(payloads), PUSH_EVENTS_PER_MESSAGE):
                chunk = payloads[start:start + PUSH_EVENTS_PER_MESSAGE]
                self._enqueue(queue, actor, chunk if len(chunk) > 1 else chunk[0], None)
                EVENTS_ACCEPTED.labels(queue).inc(len(chunk))
                sent += 1
        return sent

    def command(self, queue: str, actor: str, command: str, payload: dict[str, Any]) -> None:
        """Enqueue an internal command (re-arm a user's batch, replay, bouncer sync)."""
        self._enqueue(queue, actor, payload, command)

    def _enqueue(self, queue: str, actor: str, payload: Any, command: str | None) -> None:
        kwargs = {"command": command} if command else {}
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=(payload,), kwargs=kwargs, options={}
        )
        self.broker.enqueue(message)
