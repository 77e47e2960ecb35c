"""ops_db_api: the REST API of the CCAT operations database (FastAPI)."""

from __future__ import annotations

__version__ = "0.1.0"
