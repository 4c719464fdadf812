"""Schema migrations, applied in name order by peewee-migrate (`models.migrate`)."""
