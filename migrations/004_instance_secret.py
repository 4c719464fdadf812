"""Secrets a deployment generates for itself: the `instance_secret` table.

`supervisor.py all` without HERALD_API_KEYS generates an API key once and keeps it
here, so a restart answers the key the operator already configured, and unsubscribe
links signed with a key derived from it keep working.

The model is declared here as it is at this migration, so later changes to models.py
never change what this file creates.
"""

from __future__ import annotations

import peewee as pw
from peewee_migrate import Migrator

_TABLE = "instance_secret"


def migrate(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    @migrator.create_model
    class InstanceSecret(pw.Model):
        name = pw.CharField(max_length=64, primary_key=True)
        value = pw.TextField()
        created_at = pw.DoubleField()

        class Meta:
            table_name = _TABLE


def rollback(migrator: Migrator, database: pw.Database, *, fake: bool = False) -> None:
    migrator.remove_model(_TABLE)
