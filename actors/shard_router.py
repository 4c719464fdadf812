"""ShardRouter: starts and supervises one PushActor per shard and routes work to it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors._push_engine import PushWork
from actors.push import PushActor
from actors.supervision import ChildFailed, RestartChild, SupervisedMixin, SupervisorMixin
from delivery.outcomes import TransientDeliveryError
from settings import Settings

logger = logging.getLogger("herald.push")


@dataclass(frozen=True)
class RoutePush:
    """To the ShardRouter: hand `work` to the PushActor of `shard`."""

    shard: int
    work: PushWork


class ShardRouter(SupervisorMixin, SupervisedMixin, pykka.ThreadingActor):
    """Parent of the PushActors.

    Parameters:
      settings: `PUSH_SHARDS` and the restart budget.
      supervisor_ref: the root supervisor.
      providers: optional provider factory passed to every PushActor (tests, bench).
      schedule: how to run a restart after a delay (default: a timer thread).
    """

    def __init__(
        self,
        settings: Settings,
        supervisor_ref: pykka.ActorRef[Any] | None,
        providers: Callable[[Settings], tuple[Any, Any, Any]] | None = None,
        schedule: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.supervisor_ref = supervisor_ref
        self.supervision_key = "shard_router"
        self._providers = providers
        self._children: dict[int, pykka.ActorRef[PushActor]] = {}
        self._init_supervision(
            "ShardRouter", settings.SUPERVISOR_MAX_RESTARTS,
            settings.SUPERVISOR_PERIOD_SECONDS, schedule,
        )

    def on_start(self) -> None:
        for shard in range(self.settings.PUSH_SHARDS):
            self._restart(shard)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, RoutePush):
            child = self._children.get(message.shard)
            if child is None:
                message.work.reply.set_exception(
                    (TransientDeliveryError,
                     TransientDeliveryError(f"push shard {message.shard} is restarting"), None)
                )
                return None
            try:
                child.tell(message.work)
            except pykka.ActorDeadError:
                # The child just crashed and its ChildFailed is on the way: retry later
                # rather than let this router (and every sibling shard) die with it.
                message.work.reply.set_exception(
                    (TransientDeliveryError,
                     TransientDeliveryError(f"push shard {message.shard} is restarting"), None)
                )
        elif isinstance(message, ChildFailed):
            self._on_child_failed(message)
        elif isinstance(message, RestartChild):
            self._on_restart_child(message)
        return None

    def on_stop(self) -> None:
        self._stop_children()

    def on_crash(self) -> None:
        self._stop_children()

    def _stop_children(self) -> None:
        for ref in list(self._children.values()):
            try:
                ref.stop(block=True, timeout=30)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self._children.clear()

    def _current_child_urn(self, key: Any) -> str | None:
        ref = self._children.get(key)
        return ref.actor_urn if ref else None

    def _forget_child(self, key: Any) -> None:
        self._children.pop(key, None)

    def _restart(self, key: Any) -> None:
        shard = int(key)
        self._children[shard] = PushActor.start(
            self.settings, shard, self.actor_ref, self._providers
        )

    def _child_kind(self, key: Any) -> str:
        return "PushActor"
