"""The initial schema: users, message snapshots and flags, devices, email batches,
dead letters and idempotency keys.

The models are declared here as they were at this migration, so later changes to
models.py never change what this file creates.
"""

from __future__ import annotations

import peewee as pw
from peewee_migrate import Migrator


def migrate(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    @migrator.create_model
    class User(pw.Model):
        id = pw.BigIntegerField(primary_key=True)
        email = pw.CharField(max_length=254)
        full_name = pw.CharField(max_length=200)
        email_batching_period_seconds = pw.IntegerField(default=120)
        enable_offline_email_notifications = pw.BooleanField(default=True)
        enable_offline_push_notifications = pw.BooleanField(default=True)
        realm_name = pw.CharField(max_length=200, default="")
        realm_url = pw.CharField(max_length=500, default="")
        is_bot = pw.BooleanField(default=False)
        uuid = pw.CharField(max_length=36)
        created_at = pw.DoubleField()
        updated_at = pw.DoubleField()

        class Meta:
            table_name = "user"

    @migrator.create_model
    class Message(pw.Model):
        id = pw.BigIntegerField(primary_key=True)
        data = pw.TextField()
        deleted = pw.BooleanField(default=False)
        created_at = pw.DoubleField()

        class Meta:
            table_name = "message"

    @migrator.create_model
    class UserMessage(pw.Model):
        id = pw.AutoField()
        user_id = pw.BigIntegerField()
        message_id = pw.BigIntegerField()
        read = pw.BooleanField(default=False)
        active_push = pw.BooleanField(default=False)

        class Meta:
            table_name = "user_message"
            indexes = ((("user_id", "message_id"), True),)

    @migrator.create_model
    class PushDevice(pw.Model):
        id = pw.AutoField()
        user_id = pw.BigIntegerField(index=True)
        kind = pw.CharField(max_length=8)
        token = pw.CharField(max_length=4096)
        ios_app_id = pw.CharField(max_length=255, null=True)
        created_at = pw.DoubleField()

        class Meta:
            table_name = "push_device"
            indexes = ((("user_id", "kind", "token"), True),)

    @migrator.create_model
    class PushReceipt(pw.Model):
        id = pw.AutoField()
        user_id = pw.BigIntegerField()
        message_id = pw.BigIntegerField()
        device_id = pw.BigIntegerField()
        event = pw.CharField(max_length=16)
        created_at = pw.DoubleField()

        class Meta:
            table_name = "push_receipt"
            indexes = ((("user_id", "message_id", "device_id", "event"), True),)

    @migrator.create_model
    class ScheduledMessageNotificationEmail(pw.Model):
        id = pw.AutoField()
        user_id = pw.BigIntegerField()
        message_id = pw.BigIntegerField()
        trigger = pw.CharField(max_length=64)
        mentioned_user_group_id = pw.BigIntegerField(null=True)
        mentioned_user_group_name = pw.CharField(max_length=200, null=True)
        scheduled_timestamp = pw.DoubleField()
        claimed_by = pw.CharField(max_length=64, null=True)
        claimed_until = pw.DoubleField(null=True)
        attempts = pw.IntegerField(default=0)
        created_at = pw.DoubleField()

        class Meta:
            table_name = "scheduled_message_notification_email"
            indexes = (
                (("user_id", "message_id"), True),
                (("scheduled_timestamp",), False),
            )

    @migrator.create_model
    class DeadLetter(pw.Model):
        id = pw.AutoField()
        kind = pw.CharField(max_length=32)
        queue = pw.CharField(max_length=64, null=True)
        reason = pw.TextField()
        payload = pw.TextField()
        attempts = pw.IntegerField(default=0)
        user_id = pw.BigIntegerField(null=True, index=True)
        created_at = pw.DoubleField(index=True)
        replayed_at = pw.DoubleField(null=True)

        class Meta:
            table_name = "dead_letter"

    @migrator.create_model
    class IdempotencyKey(pw.Model):
        key = pw.CharField(max_length=300, primary_key=True)
        request_hash = pw.CharField(max_length=64)
        status = pw.IntegerField()
        body = pw.TextField()
        created_at = pw.DoubleField(index=True)

        class Meta:
            table_name = "idempotency_key"


def rollback(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    for name in (
        "idempotency_key",
        "dead_letter",
        "scheduled_message_notification_email",
        "push_receipt",
        "push_device",
        "user_message",
        "message",
        "user",
    ):
        migrator.remove_model(name)
