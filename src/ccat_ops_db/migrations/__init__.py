"""Alembic migrations of the operations database (shipped inside the package)."""
