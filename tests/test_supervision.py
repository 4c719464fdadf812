"""Supervision: a crashed actor is restarted from durable state, its siblings are
untouched, restarts are counted, and the restart budget is enforced up to the
process exiting non-zero. An actor whose start fails counts as crashed."""

from __future__ import annotations

import email
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka
import pytest
from prometheus_client import REGISTRY

import actors._push_engine as push_engine
from actors.batch import ChildUrns, UserBatchActor
from actors.runtime import ActorPool, PooledActor
from actors.supervision import (
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    ChildFailed,
    RestartBackoff,
    RestartBudget,
    SupervisedMixin,
)
from metrics import ACTOR_RESTARTS
from settings import Settings
from tests.conftest import message_event
from tests.harness import (
    ROOT,
    InProcessHerald,
    backend_env,
    free_port,
    push_actor_urns,
    wait_until,
)

# How long a push engine's loop may take to get ready in these tests, in place of the
# engine's own 10 s: ample for a loop with dry-run providers, and it keeps a hung
# engine's failed start quick.
ENGINE_WAIT_SECONDS = 2.0
# The same, where every start hangs and only the number of failures matters.
ENGINE_WAIT_SECONDS_SHORT = 0.5
# Longest a hung provider set-up waits for its release (a test that fails early must
# not leave the thread behind for good).
HANG_LIMIT_SECONDS = 60.0


def _outbox(directory: Path) -> list[email.message.Message]:
    if not directory.exists():
        return []
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(directory.glob("*.eml"))]


def _batch_children(h: InProcessHerald) -> dict[int, Any]:
    router = h.tree.routers().batch
    assert router is not None
    urns: dict[int, Any] = router.ask(ChildUrns())  # type: ignore[assignment]
    return urns


def test_restart_budget_counts_a_sliding_window() -> None:
    now = [0.0]
    budget = RestartBudget(2, 10.0, clock=lambda: now[0])
    assert budget.allow() and budget.allow()
    assert not budget.allow()  # a third restart inside 10 s
    now[0] = 10.5
    assert budget.allow()  # the first two have left the window


def test_restart_backoff_doubles_for_crashes_in_a_row_and_starts_afresh_after_a_while(
) -> None:
    now = [0.0]
    backoff = RestartBackoff(reset_seconds=60.0, clock=lambda: now[0])
    delays = []
    for _ in range(10):
        delays.append(backoff.delay("push0"))
        now[0] += 1.0
    assert delays[:3] == [RESTART_BACKOFF_MIN, RESTART_BACKOFF_MIN * 2, RESTART_BACKOFF_MIN * 4]
    assert delays[-1] == RESTART_BACKOFF_MAX
    # Another child's crashes are its own.
    assert backoff.delay("push1") == RESTART_BACKOFF_MIN
    # A child that then ran for more than a minute is restarted at once again.
    now[0] += 61.0
    assert backoff.delay("push0") == RESTART_BACKOFF_MIN
    assert backoff.delay("push0") == RESTART_BACKOFF_MIN * 2


def test_crashed_user_batch_actor_restarts_and_siblings_are_untouched(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Path(env["OUTBOX_DIR"])
    crashed: list[int] = []
    real_flush = UserBatchActor._flush

    def flaky_flush(self: UserBatchActor, *, forced: bool) -> None:
        if self.user_id == 1 and not crashed:
            crashed.append(1)
            raise RuntimeError("injected fault")
        real_flush(self, forced=forced)

    monkeypatch.setattr(UserBatchActor, "_flush", flaky_flush)
    h = InProcessHerald(env)
    try:
        h.put_user(1, email_batching_period_seconds=1)
        h.put_user(2, email_batching_period_seconds=4)
        restarts_before = ACTOR_RESTARTS.labels("UserBatchActor")._value.get()
        assert h.post_events(message_event(1, channels=("email",), topic="one"),
                             message_event(2, channels=("email",), topic="two")).status_code == 202
        sibling = wait_until(lambda: _batch_children(h).get(2), what="user 2's actor")
        wait_until(lambda: crashed, what="the injected crash")
        mails = wait_until(lambda: _outbox(outbox), timeout=15, what="user 1's email")
        assert [m["To"] for m in mails] == ["User 1 <user1@example.com>"]
        assert ACTOR_RESTARTS.labels("UserBatchActor")._value.get() == restarts_before + 1
        # The sibling's actor is the same one, and it still delivers.
        assert _batch_children(h).get(2) == sibling
        mails = wait_until(lambda: len(_outbox(outbox)) == 2 and _outbox(outbox), timeout=15,
                           what="user 2's email")
        assert sorted(m["Subject"] for m in mails) == ["#design > one", "#design > two"]
        assert h.gave_up == []
    finally:
        h.stop()


def test_restart_budget_is_enforced_up_to_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_crash(self: UserBatchActor, *, forced: bool) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(UserBatchActor, "_flush", always_crash)
    with backend_env("embedded", tmp_path) as env:
        h = InProcessHerald({**env, "OUTBOX_DIR": str(tmp_path / "outbox"),
                             "SUPERVISOR_MAX_RESTARTS": "1"})
        try:
            h.put_user(1, email_batching_period_seconds=1)
            assert h.post_events(message_event(1, channels=("email",))).status_code == 202
            reasons = wait_until(lambda: h.gave_up, timeout=30, what="the root to give up")
            assert "RootSupervisor" in reasons[0]
        finally:
            h.stop()


def test_process_exits_non_zero_past_the_budget(tmp_path: Path) -> None:
    """A PushActor that crashes on every event: the routers and then the root spend
    their budgets, and `python supervisor.py` exits 70 for its manager to restart."""
    port = free_port()
    script = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import actors.push as push\n"
        "def crash(self, work):\n"
        "    raise RuntimeError('injected fault')\n"
        "push.PushActor.handle = crash\n"
        "sys.argv = ['supervisor.py', 'all']\n"
        f"runpy.run_path({str(ROOT / 'supervisor.py')!r}, run_name='__main__')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PORT": str(port), "HERALD_API_KEYS": "k",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}", "SUPERVISOR_MAX_RESTARTS": "1",
           "RETRY_MIN_BACKOFF_MS": "20", "RETRY_MAX_BACKOFF_MS": "50",
           "RETRY_MAX_TRIES": "50"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import httpx

        headers = {"Authorization": "Bearer k"}
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get_ok(f"{base}/healthz"), timeout=30, what="herald to start")
        httpx.put(f"{base}/v1/users/1", headers=headers,
                  json={"email": "a@example.com", "full_name": "A"})
        httpx.post(f"{base}/v1/users/1/devices", headers=headers,
                   json={"kind": "fcm", "token": "t"})
        response = httpx.post(f"{base}/v1/events", headers=headers,
                              json=message_event(1, channels=("push",)))
        assert response.status_code == 202
        assert proc.wait(60) == 70
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "giving up" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _get_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.1)
        return False


# A start that fails -------------------------------------------------------------------


class _Recorder(pykka.ThreadingActor):
    """Stands in for a supervisor: keeps what its children tell it."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        self.told.append(message)
        return list(self.told)


class _FailingStart(SupervisedMixin):
    """A supervised child whose `on_start` raises; notes that it cleaned up."""

    def __init__(self, supervisor: pykka.ActorRef[Any], cleaned: list[str]) -> None:
        super().__init__()
        self.supervisor_ref = supervisor
        self.supervision_key = type(self).__name__
        self._cleaned = cleaned

    def on_start(self) -> None:
        raise RuntimeError("injected start fault")

    def on_crash(self) -> None:
        self._cleaned.append(str(self.supervision_key))


class _ThreadedFailingStart(_FailingStart, pykka.ThreadingActor):
    pass


class _PooledFailingStart(_FailingStart, PooledActor):
    pass


def test_a_child_whose_start_fails_is_reported_as_crashed() -> None:
    pool = ActorPool(1, name="test-start-fault")
    _PooledFailingStart.actor_pool = pool
    recorder = _Recorder.start()
    cleaned: list[str] = []
    try:
        refs: list[pykka.ActorRef[Any]] = [_ThreadedFailingStart.start(recorder, cleaned),
                                           _PooledFailingStart.start(recorder, cleaned)]

        def reports() -> list[Any]:
            told: list[Any] = recorder.ask(None)  # type: ignore[assignment]
            return [m for m in told if isinstance(m, ChildFailed)]

        failed = wait_until(lambda: len(reports()) == 2 and reports(), what="two reports")
        assert {f.key: f.actor_urn for f in failed} == {
            "_ThreadedFailingStart": refs[0].actor_urn,
            "_PooledFailingStart": refs[1].actor_urn,
        }
        assert {f.error for f in failed} == {"RuntimeError: injected start fault"}
        assert sorted(cleaned) == ["_PooledFailingStart", "_ThreadedFailingStart"]
        assert not any(ref.is_alive() for ref in refs)
    finally:
        recorder.stop()
        pool.shutdown()
        _PooledFailingStart.actor_pool = None


class _ClosingClient:
    """A provider client that only notes that it was closed."""

    def __init__(self, closed: list[str]) -> None:
        self._closed = closed

    async def close(self) -> None:
        self._closed.append(threading.current_thread().name)


class _HangingProviders:
    """A push provider factory (it runs on each engine's loop thread, before the loop
    is ready) that hangs where `hang(thread name)` says so, as a provider whose set-up
    never answers, until `release` is set; the engine it hung in then gets a client
    that notes its closing. Elsewhere it builds the configured providers (dry run).
    """

    def __init__(self, hang: Callable[[str], bool]) -> None:
        self._hang = hang
        self.release = threading.Event()
        self.hung: list[threading.Thread] = []
        self.closed: list[str] = []

    def __call__(self, settings: Settings) -> tuple[Any, Any, Any]:
        thread = threading.current_thread()
        if not self._hang(thread.name):
            return push_engine.build_providers(settings)
        self.hung.append(thread)
        self.release.wait(HANG_LIMIT_SECONDS)
        return _ClosingClient(self.closed), None, None


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _dry_run_pushes() -> float:
    return _sample("herald_pushes_total", provider="fcm", outcome="dry_run")


def _processed(queue: str) -> float:
    return _sample("herald_events_processed_total", queue=queue)


def _user_with_a_device(h: InProcessHerald, user_id: int) -> None:
    h.put_user(user_id)
    response = h.client.post(f"/v1/users/{user_id}/devices",
                             json={"kind": "fcm", "token": f"fcm-{user_id}"})
    assert response.status_code == 201, response.text


def _push(h: InProcessHerald, user_id: int) -> None:
    assert h.post_events(message_event(user_id, channels=("push",))).status_code == 202


def _dead_letters(h: InProcessHerald) -> int:
    import models

    return int(h.db(lambda: models.DeadLetter.select().count()))


def test_push_actor_whose_engine_does_not_start_is_restarted_and_siblings_are_untouched(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Shard 1's first engine never gets ready (its provider set-up hangs): its
    PushActor's start fails, the push waiting in its mailbox is failed for now and
    retried, the ShardRouter restarts the shard, and the new actor delivers. Shard 0
    and the router are untouched, and the engine left half-started is stopped once its
    loop comes up."""
    monkeypatch.setattr(push_engine, "LOOP_WAIT_SECONDS", ENGINE_WAIT_SECONDS)
    providers = _HangingProviders(lambda name: name == "herald-push1-loop"
                                  and not providers.hung)
    caplog.set_level(logging.INFO, logger="herald")
    restarts = ACTOR_RESTARTS.labels("PushActor")._value.get()
    h = InProcessHerald({**env, "PUSH_SHARDS": "2"}, providers=providers)
    try:
        wait_until(lambda: providers.hung, what="shard 1's engine to hang")
        _user_with_a_device(h, 2)  # shard 0
        _user_with_a_device(h, 3)  # shard 1
        sent, done = _dry_run_pushes(), _processed("push.shard1")
        router = h.tree.routers().shard
        assert router is not None
        # Taken while shard 1's actor is still starting: it waits in that mailbox.
        _push(h, 3)
        before = push_actor_urns()
        wait_until(lambda: _processed("push.shard1") > done, timeout=15,
                   what="the push of the shard whose start failed")
        assert _dry_run_pushes() == sent + 1
        assert "push shard 1 crashed" in caplog.text  # its consumer was answered
        assert ACTOR_RESTARTS.labels("PushActor")._value.get() == restarts + 1
        after = push_actor_urns()
        assert sorted(after) == [0, 1]
        assert after[0] == before[0], "shard 0 was restarted too"
        assert h.tree.routers().shard == router, "the ShardRouter was restarted"

        # Both shards deliver, with the same actors.
        _push(h, 3)
        _push(h, 2)
        wait_until(lambda: _dry_run_pushes() == sent + 3, what="a push on each shard")
        assert push_actor_urns() == after
        assert _dead_letters(h) == 0
        assert h.gave_up == []

        # The hung engine's loop comes up late: it is stopped, not left running.
        providers.release.set()
        wait_until(lambda: not providers.hung[0].is_alive(),
                   what="the half-started engine's loop to end")
        assert providers.closed == ["herald-push1-loop"]
    finally:
        providers.release.set()
        h.stop()


def test_push_engine_that_never_starts_spends_the_budgets_up_to_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start of the shard hangs: the ShardRouter restarts it within its budget,
    fails past it, the root restarts the router within its own, and gives up past it.
    Every engine left half-started is stopped once its loop comes up."""
    monkeypatch.setattr(push_engine, "LOOP_WAIT_SECONDS", ENGINE_WAIT_SECONDS_SHORT)
    providers = _HangingProviders(lambda name: True)
    shard_restarts = ACTOR_RESTARTS.labels("PushActor")._value.get()
    router_restarts = ACTOR_RESTARTS.labels("shard_router")._value.get()
    with backend_env("embedded", tmp_path) as env:
        h = InProcessHerald({**env, "OUTBOX_DIR": str(tmp_path / "outbox"),
                             "SUPERVISOR_MAX_RESTARTS": "1"}, providers=providers)
        try:
            reasons = wait_until(lambda: h.gave_up, timeout=30, what="the root to give up")
            assert "RootSupervisor" in reasons[0]
            assert "push engine did not start" in reasons[0]
            # Two routers, each restarting the shard once and failing on its next crash.
            assert ACTOR_RESTARTS.labels("PushActor")._value.get() == shard_restarts + 2
            assert ACTOR_RESTARTS.labels("shard_router")._value.get() == router_restarts + 1
        finally:
            providers.release.set()
            h.stop()
    assert len(providers.hung) == 4
    wait_until(lambda: not any(thread.is_alive() for thread in providers.hung),
               what="every half-started engine's loop to end")
    assert len(providers.closed) == 4


def test_a_push_told_to_its_shard_as_the_push_actor_stops_is_retried_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer tells its push to the shard's PushActor just as the actor stops: the
    tell found the actor alive, but lands after the actor failed what its mailbox held,
    so nothing will handle it. The consumer learns that at once (transient: its queue
    message is retried), rather than after the 120 s hand-off timeout."""
    from pykka._envelope import Envelope

    from delivery.outcomes import TransientDeliveryError
    from events import parse_event

    with backend_env("embedded", tmp_path) as env:
        h = InProcessHerald({**env, "OUTBOX_DIR": str(tmp_path / "outbox")})
        try:
            h.put_user(7)
            response = h.client.post("/v1/users/7/devices", json={"kind": "fcm",
                                                                   "token": "tok-1"})
            assert response.status_code == 201, response.text
            shard = h.tree._shard(0)
            real_tell = pykka.ActorRef.tell

            def tell_as_it_stops(ref: pykka.ActorRef[Any], message: Any) -> None:
                if ref is not shard.actor or not isinstance(message, list):
                    real_tell(ref, message)
                    return
                ref.stop()  # waits until the actor has stopped
                ref.actor_inbox.put(Envelope(message))

            monkeypatch.setattr(pykka.ActorRef, "tell", tell_as_it_stops)
            event = parse_event(message_event(7, channels=("push",)))
            started = time.monotonic()
            [outcome] = h.tree.push(0, [(event, None)])
            waited = time.monotonic() - started
            monkeypatch.undo()
        finally:
            h.stop()
    assert isinstance(outcome, TransientDeliveryError), outcome
    assert "stopped before handling the event" in str(outcome)
    assert waited < 30, f"waited {waited:.0f}s, as for the hand-off timeout"
