"""Alembic migrations of the control plane's database (applied by ``Database.migrate``)."""
