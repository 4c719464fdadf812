"""`PUT /v1/users/{user_id}`: what a profile update keeps of the stored user, and
creates of one user racing each other. Run on both backends unless a test says."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ingest.openapi import openapi_document
from rendering.unsubscribe import make_unsubscribe_token
from tests.harness import InProcessHerald

USER = 7
SETTINGS = ("enable_offline_email_notifications", "enable_offline_push_notifications")


def test_an_unsubscribe_outlives_the_next_profile_update(idle_herald: InProcessHerald) -> None:
    # The chat server PUTs a user on every profile change (here, a new name), and such
    # a PUT does not carry the settings herald changes itself.
    idle_herald.put_user(USER)
    token = make_unsubscribe_token(USER, idle_herald.settings.secret_key)
    response = idle_herald.client.post(f"/v1/unsubscribe/{token}",
                                content=b"List-Unsubscribe=One-Click",
                                headers={"Authorization": "",
                                         "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text

    renamed = idle_herald.put_user(USER, full_name="Ada Lovelace")
    assert renamed["full_name"] == "Ada Lovelace"
    assert renamed["enable_offline_email_notifications"] is False
    assert idle_herald.client.get(f"/v1/users/{USER}").json() == renamed


def test_an_omitted_notification_setting_keeps_its_stored_value(
    idle_herald: InProcessHerald,
) -> None:
    new = idle_herald.put_user(USER)
    assert [new[s] for s in SETTINGS] == [True, True]

    idle_herald.put_user(USER, **dict.fromkeys(SETTINGS, False))
    kept = idle_herald.put_user(USER, email_batching_period_seconds=300)
    assert kept["email_batching_period_seconds"] == 300
    assert [kept[s] for s in SETTINGS] == [False, False]

    # An explicit value is applied, and only to its own setting.
    push_on = idle_herald.put_user(USER, enable_offline_push_notifications=True)
    assert [push_on[s] for s in SETTINGS] == [False, True]
    email_on = idle_herald.put_user(USER, enable_offline_email_notifications=True)
    assert [email_on[s] for s in SETTINGS] == [True, True]
    assert idle_herald.client.get(f"/v1/users/{USER}").json() == email_on


def test_the_document_says_an_omitted_setting_is_kept() -> None:
    schema = openapi_document()["components"]["schemas"]["UserSettingsIn"]
    for name in SETTINGS:
        assert name not in schema.get("required", []), name
        field = schema["properties"][name]
        assert field["type"] == "boolean" and field["default"] is True, field
        assert "stored value is kept" in field["description"], field


# Rounds of concurrent creates, each of a user of its own, and PUTs per round.
CREATE_ROUNDS = 10
CONCURRENT_PUTS = 8


@pytest.mark.parametrize("backend", ["production"])
def test_concurrent_puts_creating_one_user_all_answer_200(env: dict[str, str]) -> None:
    # Retries of a PUT that timed out, or two chat server processes seeing the same new
    # user, arrive together; each must get the stored user, not a 503.
    h = InProcessHerald(env, start_worker=False)
    try:
        for round_ in range(CREATE_ROUNDS):
            user_id = 100 + round_
            body = {"email": f"user{user_id}@example.com", "full_name": "Grace"}
            start = threading.Barrier(CONCURRENT_PUTS)

            def put(_: int, user_id: int = user_id, body: dict[str, Any] = body,
                    start: threading.Barrier = start) -> Any:
                start.wait()
                return h.client.put(f"/v1/users/{user_id}", json=body)

            with ThreadPoolExecutor(CONCURRENT_PUTS) as pool:
                answers = list(pool.map(put, range(CONCURRENT_PUTS)))
            assert [a.status_code for a in answers] == [200] * CONCURRENT_PUTS, \
                [a.text for a in answers if a.status_code != 200]
            stored = h.client.get(f"/v1/users/{user_id}").json()
            assert stored["email"] == body["email"]
            assert all(a.json() == stored for a in answers)
    finally:
        h.stop()
