"""Supervision: a crashed actor is restarted from durable state, its siblings are
untouched, restarts are counted, and the restart budget is enforced up to the
process exiting non-zero."""

from __future__ import annotations

import email
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from actors.batch import ChildUrns, UserBatchActor
from actors.supervision import RestartBudget
from metrics import ACTOR_RESTARTS
from tests.conftest import message_event
from tests.harness import ROOT, InProcessHerald, backend_env, free_port, wait_until


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
