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


def _email_letter(database_url: str, reason: str, topic: str) -> int:
    event = message_event(7, channels=("email",), topic=topic)
    return _store(database_url, kind="queue_message", queue="email", reason=reason,
                  payload={"queue": "email", "actor": "email", "args": [event], "kwargs": {}},
                  attempts=10, user_id=7)


def _email_depth(broker_url: str) -> int:
    try:
        return rabbit_queue_depth(broker_url, "email")
    except Exception:  # never declared: nothing was sent
        return 0


def test_replay_all_sends_what_the_filters_select_and_nothing_else(tmp_path: Path) -> None:
    """After an outage: replay every letter whose reason says timeout, oldest first; a
    device a provider refused is never replayed."""
    with backend_env("production", tmp_path) as env:
        first = _email_letter(env["DATABASE_URL"], "gave up after 10 tries: timeout", "a")
        second = _email_letter(env["DATABASE_URL"], "gave up after 10 tries: timeout", "b")
        other = _email_letter(env["DATABASE_URL"], "refused: 503 Service Unavailable", "c")
        _store(env["DATABASE_URL"], kind="push_device", reason="apns: BadDeviceToken",
               payload={"user_id": 7, "device_id": 1}, attempts=1, user_id=7)

        dry = _cli(env, "replay", "--all", "--reason", "timeout", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would replay 2 dead letter(s)" in dry.stdout
        assert _email_depth(env["BROKER_URL"]) == 0
        assert len(_cli(env, "list").stdout.strip().splitlines()) == 4

        selected = _cli(env, "replay", "--all", "--reason", "timeout")
        assert selected.returncode == 0, selected.stderr
        assert selected.stdout.splitlines() == [
            f"replayed dead letter {first}", f"replayed dead letter {second}",
            "replayed 2 of 2 dead letter(s)"]
        assert _email_depth(env["BROKER_URL"]) == 2
        left = _cli(env, "list").stdout
        assert "503 Service Unavailable" in left and "BadDeviceToken" in left
        assert "timeout" not in left

        rest = _cli(env, "replay", "--all")
        assert rest.returncode == 0, rest.stderr
        assert rest.stdout.splitlines() == [f"replayed dead letter {other}",
                                            "replayed 1 of 1 dead letter(s)"]
        assert _email_depth(env["BROKER_URL"]) == 3
        assert _cli(env, "list").stdout.strip().splitlines()[0].split()[3] == "push_device"


def test_replay_by_ids_says_which_could_not_be(tmp_path: Path) -> None:
    with backend_env("production", tmp_path) as env:
        done = _email_letter(env["DATABASE_URL"], "timeout", "a")
        assert _cli(env, "replay", str(done)).returncode == 0
        fresh = _email_letter(env["DATABASE_URL"], "timeout", "b")
        dry = _cli(env, "replay", "--dry-run", str(done), str(fresh), "999")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines()[-1] == "would replay 1 dead letter(s)"
        assert dry.stdout.splitlines()[0].split()[0] == str(fresh)
        both = _cli(env, "replay", str(done), str(fresh), "999")
        assert both.returncode == 1
        assert both.stdout.splitlines() == [f"replayed dead letter {fresh}"]
        assert f"dead letter {done} was already replayed" in both.stderr
        assert "no dead letter 999" in both.stderr
        assert _email_depth(env["BROKER_URL"]) == 2
        assert _cli(env, "replay", "--reason", "timeout", str(fresh)).returncode == 2
        assert _cli(env, "replay").returncode == 2


def test_a_replay_the_broker_cannot_take_leaves_the_letters_as_they_were(
    tmp_path: Path,
) -> None:
    with backend_env("production", tmp_path) as env:
        letters = [_email_letter(env["DATABASE_URL"], "timeout", t) for t in ("a", "b")]
        unreachable = {**env, "BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
        failed = _cli(unreachable, "replay", "--all")
        assert failed.returncode == 1
        assert f"dead letter {letters[0]}: not sent, left as it was" in failed.stderr
        assert "1 more not tried" in failed.stderr
        assert "replayed 0 of 2 dead letter(s)" in failed.stdout
        assert "(replayed)" not in _cli(env, "list", "--all").stdout
        again = _cli(env, "replay", "--all")  # the broker is back
        assert again.returncode == 0, again.stderr
        assert _email_depth(env["BROKER_URL"]) == 2
