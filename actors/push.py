"""PushActor: one per push shard, owning that shard's deliveries.

The actor's own thread only hands work to its `PushEngine` (an asyncio loop on a
second thread), in mailbox order; the engine keeps each user's work in the order the
consumer threads took it, while sends for different users overlap. The consumer
threads also reach the engine directly (`PushEngine.admit`), to take their places in
line and plan; the actor owns the engine's life: it starts it, and stops it when it
stops or crashes. A start that fails (the engine's loop not ready in time) is a crash
like any other: the ShardRouter restarts the shard with a new engine.
"""

from __future__ import annotations

import queue
from typing import Any, cast

import pykka

from actors._push_engine import PushEngine, PushWork
from actors.supervision import SupervisedMixin
from delivery.outcomes import TransientDeliveryError


class PushActor(SupervisedMixin, pykka.ThreadingActor):
    """Delivers one shard's pushes and removes.

    Parameters:
      engine: the shard's engine, new and not started (the actor starts and stops it).
      supervisor_ref: the ShardRouter.
    """

    def __init__(self, engine: PushEngine, supervisor_ref: pykka.ActorRef[Any] | None) -> None:
        super().__init__()
        self.shard = engine.shard
        self.supervisor_ref = supervisor_ref
        self.supervision_key = engine.shard
        self.engine = engine

    def on_start(self) -> None:
        """Runs on the actor's thread before its first message: start the engine.

        If the engine does not start, this raises, and `SupervisedMixin` reports it to
        the ShardRouter as a crash (`on_crash` then runs, on this thread).
        """
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
        self._fail_what_is_left("stopped")

    def on_crash(self) -> None:
        """Runs on the actor's thread as it dies, of a message or of its start."""
        self.engine.stop()
        self._fail_what_is_left("crashed")

    def _fail_what_is_left(self, how: str) -> None:
        """Runs on the actor's thread as it stops or dies, once the engine has stopped.

        Pykka drops told messages left in a stopped actor's mailbox, and the consumers
        waiting on their replies would hang: fail those replies as transient (the
        queue messages are retried once the shard is back). Anything else goes back
        for Pykka's own teardown. A tell can still land after this (it checked that
        the actor was alive just before): `engine.gone` tells its consumer that
        nothing will answer it.
        """
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
                        TransientDeliveryError(f"push shard {self.shard} {how}"),
                        None,
                    ))
            else:
                others.append(envelope)
        for envelope in others:
            inbox.put(envelope)
        self.engine.gone.set()
