"""The Dramatiq actors that consume herald's queues and hand events to the actor tree.

Each consumer is its `consume()`: parse, hand over, wait for the outcome. The
machinery (acks, retries, dead letters, metrics) lives once, in the broker and its
middleware. A consumer returns only when the work is done or durably recorded, so
the broker acks only then.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import dramatiq
from pydantic import ValidationError

from events import parse_event
from intake.middleware.retries import EventsFailed, InvalidMessage
from intake.queues import EMAIL_ACTOR, EMAIL_QUEUE, push_actor, push_queue

logger = logging.getLogger("herald.intake.consumers")

# Internal commands that travel on the queues beside the public events.
COMMAND_REARM_USER = "rearm_user"
COMMAND_REPLAY_EMAIL_BATCH = "replay_email_batch"
COMMAND_BOUNCER_REGISTER = "register_push_device_to_bouncer"
COMMAND_BOUNCER_UNREGISTER = "unregister_push_device_from_bouncer"
PUSH_COMMANDS = frozenset({COMMAND_BOUNCER_REGISTER, COMMAND_BOUNCER_UNREGISTER})
EMAIL_COMMANDS = frozenset({COMMAND_REARM_USER, COMMAND_REPLAY_EMAIL_BATCH})


# One piece of push work: (event, None) or (None, command).
PushItem = tuple[Any, dict[str, Any] | None]


class Handlers(Protocol):
    """What the consumers hand work to: the worker's actor tree.

    Both methods run on a Dramatiq worker thread and block until the work is done or
    durably recorded. `email` raises `TransientDeliveryError` to retry later and
    `PermanentDeliveryError` to dead-letter; `push` takes a message's items in order
    and answers, per item, None when done or the exception it failed with.
    """

    def push(self, shard: int, items: list[PushItem]) -> list[BaseException | None]: ...

    def email(self, event: Any, command: dict[str, Any] | None) -> None: ...


def _parse(payload: Any, command: str | None, allowed: frozenset[str]) -> tuple[Any, Any]:
    if command is not None:
        if command not in allowed or not isinstance(payload, dict):
            raise InvalidMessage(f"unknown command {command!r}")
        return None, {"command": command, **payload}
    try:
        return parse_event(payload), None
    except ValidationError as exc:
        raise InvalidMessage(f"invalid event: {exc.errors()[0].get('msg')}") from None


class Consumers:
    """Declares herald's Dramatiq actors on `broker`.

    Parameters:
      broker: the broker to declare the queues and actors on.
      shards: `PUSH_SHARDS`; one push queue and actor per shard.

    A web process declares them only to publish; a worker process calls `attach()`
    with the actor tree before starting a Dramatiq worker.
    """

    def __init__(self, broker: dramatiq.Broker, shards: int) -> None:
        self.broker = broker
        self.shards = shards
        self._handlers: Handlers | None = None
        for shard in range(shards):
            dramatiq.actor(broker=broker, actor_name=push_actor(shard),
                           queue_name=push_queue(shard))(self._push_consumer(shard))
        dramatiq.actor(broker=broker, actor_name=EMAIL_ACTOR,
                       queue_name=EMAIL_QUEUE)(self._consume_email)

    def attach(self, handlers: Handlers) -> None:
        self._handlers = handlers

    def _require_handlers(self) -> Handlers:
        if self._handlers is None:
            # A message reached a process without an actor tree: let it retry elsewhere.
            raise RuntimeError("no actor tree in this process")
        return self._handlers

    def _push_consumer(self, shard: int) -> Any:
        def consume(payload: Any, command: str | None = None) -> None:
            payloads = payload if isinstance(payload, list) and command is None else [payload]
            if not payloads:
                raise InvalidMessage("empty event list")
            items = [_parse(one, command, PUSH_COMMANDS) for one in payloads]
            outcomes = self._require_handlers().push(shard, items)
            failures = [(one, exc) for one, exc in zip(payloads, outcomes, strict=True)
                        if exc is not None]
            if not failures:
                return
            if len(payloads) == 1:
                raise failures[0][1]
            raise EventsFailed(failures)

        consume.__name__ = push_actor(shard)
        return consume

    def _consume_email(self, payload: Any, command: str | None = None) -> None:
        event, cmd = _parse(payload, command, EMAIL_COMMANDS)
        self._require_handlers().email(event, cmd)
