"""Claim ids fit any host name: `claimed_by` widens from 64 to 255 characters.

A claim id is the worker's name (host name, process id, a random part), the claim
group and the user id; a long host name (a cloud VM's, a Kubernetes pod's) made it
longer than 64 characters, which PostgreSQL refused for the whole group's claim.
SQLite does not enforce the length, so only PostgreSQL changes.
"""

from __future__ import annotations

import peewee as pw
from peewee_migrate import Migrator

_TABLE = "scheduled_message_notification_email"


def migrate(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    if isinstance(database, pw.PostgresqlDatabase):
        migrator.sql(f"ALTER TABLE {_TABLE} ALTER COLUMN claimed_by TYPE varchar(255)")


def rollback(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    if isinstance(database, pw.PostgresqlDatabase):
        migrator.sql(f"ALTER TABLE {_TABLE} ALTER COLUMN claimed_by TYPE varchar(64)")
