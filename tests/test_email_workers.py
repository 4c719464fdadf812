"""Two worker processes on one RabbitMQ + PostgreSQL never send a user's batch twice
and never split it.

Two `python supervisor.py worker` subprocesses consume the same `email` queue; the
test process publishes through the ingest API (an in-process herald without a worker)
and receives the emails on a real SMTP server (aiosmtpd).
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    HeraldProcess,
    InProcessHerald,
    pg_schema,
    rabbit_vhost,
    wait_until,
)

# `smtp` is the fixture of the single-worker email tests: one real aiosmtpd server.
from tests.test_email_batching import (
    SmtpInbox,
    addr,
    event,
    mid,
    pending,
    smtp_server,  # noqa: F401
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.rabbitmq]

USERS = (11, 12, 13, 14)
PERIOD = 4
# Per user: two stream topics (one spelt two ways) and a DM thread.
CONVERSATIONS: dict[str, dict[str, Any]] = {
    "#design > logo": {"topic": "logo"},
    "#design > colours": {"topic": "colours"},
    "DMs with Bob": {"stream": None, "sender": "Bob", "sender_id": 4},
}
PER_CONVERSATION = 10


def test_two_workers_send_each_batch_once_and_whole(smtp: SmtpInbox, tmp_path: Path) -> None:
    with pg_schema() as db_url, rabbit_vhost() as broker_url:
        env = {"DATABASE_URL": db_url, "BROKER_URL": broker_url,
               "SMTP_URL": f"smtp://127.0.0.1:{smtp.port}"}
        publisher = InProcessHerald(env, start_worker=False)  # migrates the schema
        workers = [HeraldProcess({**env, "WORKER_THREADS": "16"}, mode="worker", cwd=tmp_path)
                   for _ in range(2)]
        try:
            for w in workers:
                w.start(wait=False)
            for w in workers:
                wait_until(partial(_started_or_dead, w), timeout=30, what="a worker to start")
                assert w.proc is not None and w.proc.poll() is None, w.output()
            _run(publisher, smtp)
            for w in workers:
                assert w.terminate(timeout=60) == 0, w.output()
        finally:
            for w in workers:
                w.__exit__(None, None, None)
            publisher.stop()


def _started_or_dead(w: HeraldProcess) -> bool:
    assert w.proc is not None
    return b"worker started" in w.log.read_bytes() or w.proc.poll() is not None


def _run(h: InProcessHerald, smtp: SmtpInbox) -> None:
    for uid in USERS:
        h.put_user(uid, email_batching_period_seconds=PERIOD)
    expected: dict[tuple[str, str], list[int]] = {}
    events: list[dict[str, Any]] = []
    for i in range(PER_CONVERSATION):
        for uid in USERS:
            for subject, shape in CONVERSATIONS.items():
                kw = dict(shape)
                if subject == "#design > logo" and i % 2:
                    kw["topic"] = "LOGO"  # the same topic, another spelling
                e = event(uid, **kw)
                events.append(e)
                expected.setdefault((addr(uid), subject), []).append(mid(e))
    # Interleaved users and conversations, in small requests, so both workers record
    # rows of every user's window.
    for start in range(0, len(events), 6):
        response = h.post_events(*events[start:start + 6])
        assert response.status_code == 202, response.text

    def all_recorded() -> bool:
        return sum(len(pending(h, uid)) for uid in USERS) == len(events)

    wait_until(all_recorded, timeout=PERIOD * 0.75, what="every event to be recorded")
    windows = {uid: set(pending(h, uid).values()) for uid in USERS}
    assert all(len(w) == 1 for w in windows.values()), f"one window per user: {windows}"

    smtp.wait_for(len(expected), timeout=PERIOD + 15)
    wait_until(lambda: all(not pending(h, uid) for uid in USERS), timeout=10,
               what="every batch to be finished")
    time.sleep(2.0)
    emails = smtp.emails()
    counts = Counter((r.to, r.subject) for r in emails)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"batches sent more than once or split: {duplicates}"
    assert set(counts) == set(expected)
    for r in emails:
        assert r.message_ids == sorted(expected[(r.to, r.subject)]), (r.to, r.subject)
    assert len({r.header("Message-ID") for r in emails}) == len(emails)
