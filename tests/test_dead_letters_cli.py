"""`python supervisor.py dead-letters list|show|replay`, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import message_event
from tests.harness import ROOT, backend_env, rabbit_queue_depth


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, str(ROOT / "supervisor.py"), "dead-letters", *args],
                          env=full, capture_output=True, text=True, timeout=60, cwd=ROOT)


def _store(database_url: str, **fields: object) -> int:
    import models
    from intake import dead_letters

    database = models.open_database(database_url)
    models.migrate()
    try:
        return dead_letters.record(**fields)  # type: ignore[arg-type]
    finally:
        database.close()


def _count_rows(database_url: str, user_id: int) -> int:
    import models

    row = models.ScheduledMessageNotificationEmail
    with models.open_database(database_url).connection_context():
        return int(row.select().where(row.user_id == user_id).count())


def test_list_show_and_replay_an_email_batch_on_the_embedded_default(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    letter = _store(env["DATABASE_URL"], kind="email_batch", reason="550 mailbox unavailable",
                    payload={"user_id": 7, "rows": [{"message_id": 11, "trigger": "mentioned"}]},
                    attempts=1, user_id=7)
    listing = _cli(env, "list")
    assert listing.returncode == 0, listing.stderr
    assert "550 mailbox unavailable" in listing.stdout and "email_batch" in listing.stdout
    shown = _cli(env, "show", str(letter))
    assert json.loads(shown.stdout)["payload"]["rows"][0]["message_id"] == 11
    assert _count_rows(env["DATABASE_URL"], 7) == 0
    replay = _cli(env, "replay", str(letter))
    assert replay.returncode == 0, replay.stderr
    assert _count_rows(env["DATABASE_URL"], 7) == 1  # back in the batch, due now
    again = _cli(env, "replay", str(letter))
    assert again.returncode == 1 and "already replayed" in again.stderr
    assert "no dead letter 999" in _cli(env, "show", "999").stderr


def test_replay_a_queue_message_onto_rabbitmq(tmp_path: Path) -> None:
    with backend_env("production", tmp_path) as env:
        event = message_event(7, channels=("email",))
        letter = _store(env["DATABASE_URL"], kind="queue_message", queue="email",
                        reason="gave up after 10 tries: timeout",
                        payload={"queue": "email", "actor": "email", "args": [event],
                                 "kwargs": {}}, attempts=10, user_id=7)
        replay = _cli(env, "replay", str(letter))
        assert replay.returncode == 0, replay.stderr
        assert rabbit_queue_depth(env["BROKER_URL"], "email") == 1
        assert "(replayed)" in _cli(env, "list", "--all").stdout
        assert _cli(env, "list").stdout.strip() == "no dead letters"
