"""A `message_deleted` naming thousands of messages, on each backend's database: every
push shard and the email side mark them, and a late `message` event for one of them
neither pushes nor emails."""

from __future__ import annotations

import pytest

from events import MessageEvent, parse_event
from tests.conftest import message_event

# More ids than one multi-row statement holds, so the marking takes several.
DELETED = list(range(1, 2001))


def _event(user: int, message_id: int) -> MessageEvent:
    event = parse_event(message_event(user, message_id=message_id))
    assert isinstance(event, MessageEvent)
    return event


@pytest.mark.parametrize("repeats", [[], [1999, 2000, 2000]])
def test_thousands_of_deleted_messages_are_each_marked_and_stay_deleted(
    database: None, repeats: list[int]
) -> None:
    import models
    from actors import _batch_store as batch_store
    from actors import _push_store as push_store

    models.User.create(id=7, email="user7@example.com", full_name="Ada")
    models.PushDevice.create(user_id=7, kind="fcm", token="one")
    # User 7 has a push out for message 1500 and an email pending for it.
    [plan] = push_store.plan_pushes([_event(7, 1500)])
    assert plan is not None
    batch_store.record_many([_event(7, 1500)])

    # What two push shards and the email side do with the same event; a replayed
    # queue message may carry an id twice.
    ids = DELETED + repeats
    push_store.mark_deleted(ids)
    push_store.mark_deleted(ids)
    assert push_store.pushes_out_for(ids, 1, 2) == [7]
    assert push_store.pushes_out_for(ids, 0, 2) == []
    assert batch_store.drop_deleted(ids) == [7]

    deleted = models.Message.select().where(models.Message.deleted == True)  # noqa: E712
    assert sorted(m.id for m in deleted) == DELETED
    assert not models.ScheduledMessageNotificationEmail.select().exists()
    # A message event that arrives after its deletion is neither pushed nor batched.
    assert push_store.plan_pushes([_event(7, 1200)]) == [None]
    assert batch_store.record_many([_event(7, 1200)]) == [None]
    assert not models.ScheduledMessageNotificationEmail.select().exists()
