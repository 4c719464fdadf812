"""ShardRouter: starts and supervises one PushActor per shard and publishes where they are.

Routing is a table lookup: the router publishes {shard: PushShard} (the PushActor and
its engine) whenever a child starts or goes, and the consumer threads hand work to the
shard's engine and PushActor directly.
Passing every push through the router's own mailbox as well cost a thread hand-off per
push (under one GIL, a measurable share of a push's CPU) and bought nothing: the
consumer threads race each other anyway, and the PushEngine's per-user lines, not
mailbox order, keep a user's events in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors._push_engine import PushEngine
from actors.push import PushActor
from actors.supervision import ChildFailed, RestartChild, SupervisedMixin, SupervisorMixin
from settings import Settings

logger = logging.getLogger("herald.push")


@dataclass(frozen=True)
class PushShard:
    """One shard as the consumer threads see it: its PushActor and the actor's engine."""

    actor: pykka.ActorRef[Any]
    engine: PushEngine


ShardTable = dict[int, PushShard]


class ShardRouter(SupervisorMixin, SupervisedMixin, pykka.ThreadingActor):
    """Parent of the PushActors.

    Parameters:
      settings: `PUSH_SHARDS` and the restart budget.
      supervisor_ref: the root supervisor.
      providers: optional provider factory passed to every shard's engine (tests, bench).
      schedule: how to run a restart after a delay (default: a timer thread).
      publish: called (on the router's thread) with the current {shard: PushShard}
        table whenever it changes.
    """

    def __init__(
        self,
        settings: Settings,
        supervisor_ref: pykka.ActorRef[Any] | None,
        providers: Callable[[Settings], tuple[Any, Any, Any]] | None = None,
        schedule: Callable[[float, Callable[[], None]], Any] | None = None,
        publish: Callable[[ShardTable], None] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._publish = publish
        self.supervisor_ref = supervisor_ref
        self.supervision_key = "shard_router"
        self._providers = providers
        self._children: dict[int, PushShard] = {}
        self._init_supervision(
            "ShardRouter", settings.SUPERVISOR_MAX_RESTARTS,
            settings.SUPERVISOR_PERIOD_SECONDS, schedule,
        )

    def on_start(self) -> None:
        for shard in range(self.settings.PUSH_SHARDS):
            self._restart(shard)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ChildFailed):
            self._on_child_failed(message)
        elif isinstance(message, RestartChild):
            self._on_restart_child(message)
        return None

    def on_stop(self) -> None:
        self._stop_children()

    def on_crash(self) -> None:
        self._stop_children()

    def _stop_children(self) -> None:
        children = list(self._children.values())
        self._children.clear()
        self._publish_table()  # no new work for children on their way out
        for child in children:
            try:
                child.actor.stop(block=True, timeout=30)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass

    def _current_child_urn(self, key: Any) -> str | None:
        child = self._children.get(key)
        return child.actor.actor_urn if child else None

    def _forget_child(self, key: Any) -> None:
        self._children.pop(key, None)
        self._publish_table()

    def _restart(self, key: Any) -> None:
        shard = int(key)
        engine = PushEngine(self.settings, shard, self._providers)
        self._children[shard] = PushShard(PushActor.start(engine, self.actor_ref), engine)
        self._publish_table()

    def _publish_table(self) -> None:
        if self._publish is not None:
            self._publish(dict(self._children))

    def _child_kind(self, key: Any) -> str:
        return "PushActor"
