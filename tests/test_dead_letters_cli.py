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


def _depth_if_declared(broker_url: str, queue: str) -> int | None:
    try:
        return rabbit_queue_depth(broker_url, queue)
    except Exception:  # never declared
        return None


def test_a_letter_for_a_push_queue_no_worker_consumes_is_refused_and_kept(
    tmp_path: Path,
) -> None:
    """PUSH_SHARDS was 2 when the letter was written, and is 1 now: nothing consumes
    push.shard1, so sending the letter there would lose its events."""
    with backend_env("production", tmp_path) as env:
        event = message_event(7, channels=("push",))
        letter = _store(env["DATABASE_URL"], kind="queue_message", queue="push.shard1",
                        reason="gave up after 10 tries: timeout",
                        payload={"queue": "push.shard1", "actor": "push_shard1",
                                 "args": [event], "kwargs": {}}, attempts=10, user_id=7)

        dry = _cli(env, "replay", "--all", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == ["would replay 0 dead letter(s)"]

        refused = _cli(env, "replay", str(letter))
        assert refused.returncode == 1
        assert refused.stdout == ""
        said, _, body = refused.stderr.partition("\n")
        assert said.startswith(f"herald: dead letter {letter} is for queue push.shard1, ")
        assert "PUSH_SHARDS=1" in said and "left unreplayed" in said
        assert json.loads(body) == event  # to POST again, onto the shard it has now
        assert refused.stderr == dry.stderr
        assert _cli(env, "replay", "--all").stdout.splitlines() == [
            "replayed 0 of 1 dead letter(s)"]
        assert _depth_if_declared(env["BROKER_URL"], "push.shard1") is None
        assert "(replayed)" not in _cli(env, "list", "--all").stdout

        restored = _cli({**env, "PUSH_SHARDS": "2"}, "replay", str(letter))
        assert restored.returncode == 0, restored.stderr
        assert rabbit_queue_depth(env["BROKER_URL"], "push.shard1") == 1


def test_ids_beyond_what_the_database_stores_are_a_usage_error(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    too_big = str(2**63)
    for args in (("show", "99999999999999999999"), ("show", too_big), ("show", "0"),
                 ("replay", too_big), ("replay", "1", "99999999999999999999"),
                 ("replay", "--dry-run", too_big)):
        done = _cli(env, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert "must be from 1 to 9223372036854775807" in done.stderr.splitlines()[-1]
    largest = _cli(env, "show", str(2**63 - 1))
    assert largest.returncode == 1
    assert largest.stderr.splitlines()[-1] == f"herald: no dead letter {2**63 - 1}"


def test_list_limit_must_be_at_least_one(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    _store(env["DATABASE_URL"], kind="email_batch", reason="550 mailbox unavailable",
           payload={"user_id": 7, "rows": []}, attempts=1, user_id=7)
    for limit in ("0", "-1", str(2**63)):
        done = _cli(env, "list", "--limit", limit)
        assert done.returncode == 2, (limit, done.stdout)
        assert "no dead letters" not in done.stdout and "Traceback" not in done.stderr
    one = _cli(env, "list", "--limit", "1")
    assert one.returncode == 0 and "550 mailbox unavailable" in one.stdout


def test_a_dry_run_on_the_embedded_default_refuses_what_the_replay_refuses(
    tmp_path: Path,
) -> None:
    """A shared push message (two events, a JSON list) cannot be replayed without
    RabbitMQ; the body printed in its place is one POST /v1/events takes."""
    from tests.harness import InProcessHerald

    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    events = [message_event(7, channels=("push",)), message_event(7, channels=("push",))]
    letter = _store(env["DATABASE_URL"], kind="queue_message", queue="push.shard0",
                    reason="gave up after 10 tries: timeout",
                    payload={"queue": "push.shard0", "actor": "push_shard0",
                             "args": [events], "kwargs": {}}, attempts=10, user_id=7)

    dry = _cli(env, "replay", "--all", "--dry-run")
    real = _cli(env, "replay", "--all")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == ["would replay 0 dead letter(s)"]
    assert real.returncode == 1
    assert real.stdout.splitlines() == ["replayed 0 of 1 dead letter(s)"]
    assert dry.stderr == real.stderr
    said, _, body = real.stderr.partition("\n")
    assert said.startswith(f"herald: dead letter {letter}: replaying a queue message "
                           "needs BROKER_URL")
    assert json.loads(body) == {"events": events}

    api = InProcessHerald({"DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}"},
                          start_worker=False)
    try:
        api.put_user(7)
        posted = api.client.post("/v1/events", content=body,
                                 headers={"Content-Type": "application/json"})
    finally:
        api.stop()
    assert posted.status_code == 202, posted.text
    assert posted.json() == {"accepted": 2}
