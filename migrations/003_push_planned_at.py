"""When a message's push was last planned: `user_message.push_planned_at`.

A push is planned (marked active) before it is sent, and another worker process may
take the user's `read` in between. A remove planned while the push it removes is still
on its way must wait for it, or the device would show the push after its remove; this
column says which pushes may still be on their way.
"""

from __future__ import annotations

import peewee as pw
from peewee_migrate import Migrator

_TABLE = "user_message"


def migrate(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    kind = "DOUBLE PRECISION" if isinstance(database, pw.PostgresqlDatabase) else "REAL"
    migrator.sql(f"ALTER TABLE {_TABLE} ADD COLUMN push_planned_at {kind}")


def rollback(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    migrator.sql(f"ALTER TABLE {_TABLE} DROP COLUMN push_planned_at")
