"""PushActor: one per push shard, owning that shard's deliveries.

The actor's own thread only hands work to its `PushEngine` (an asyncio loop on a
second thread), in mailbox order; the engine keeps each user's work in that order
while sends for different users overlap.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any, cast

import pykka

from actors._push_engine import PushEngine, PushWork
from actors.supervision import SupervisedMixin
from delivery.outcomes import TransientDeliveryError
from settings import Settings


class PushActor(SupervisedMixin, pykka.ThreadingActor):
    """Delivers one shard's pushes and removes.

    Parameters:
      settings: provider credentials, caps and timeouts.
      shard: the shard number.
      supervisor_ref: the ShardRouter.
      providers: optional factory for the provider clients (see `PushEngine`).
    """

    def __init__(
        self,
        settings: Settings,
        shard: int,
        supervisor_ref: pykka.ActorRef[Any] | None,
        providers: Callable[[Settings], tuple[Any, Any, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.shard = shard
        self.supervisor_ref = supervisor_ref
        self.supervision_key = shard
        self.engine = PushEngine(settings, shard, providers)

    def on_start(self) -> None:
        self.engine.start()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, list):
            try:
                self.handle(message)
            except BaseException:
                # Fail the waiting consumer at once (it retries later), then crash.
                for work in message:
                    work.reply.set_exception()
                raise
        return None

    def handle(self, works: list[PushWork]) -> None:
        """Runs on the actor's thread, in mailbox order; a message's works in its order."""
        self.engine.submit(works)

    def on_stop(self) -> None:
        self.engine.stop()

    def on_crash(self) -> None:
        self.engine.stop()
        # Pykka drops told messages left in a dead actor's mailbox, and the consumers
        # waiting on their replies would hang: fail those replies as transient (the
        # queue messages are retried once the shard is back). Anything else goes back
        # for Pykka's own teardown.
        inbox = cast("queue.Queue[Any]", self.actor_inbox)  # a ThreadingActor's inbox
        others = []
        while True:
            try:
                envelope = inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(envelope.message, list):
                for work in envelope.message:
                    work.reply.set_exception((
                        TransientDeliveryError,
                        TransientDeliveryError(f"push shard {self.shard} crashed"),
                        None,
                    ))
            else:
                others.append(envelope)
        for envelope in others:
            inbox.put(envelope)
