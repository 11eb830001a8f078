"""Persistence: SQLAlchemy 2 async models, engine/session factory, Alembic migrations."""
