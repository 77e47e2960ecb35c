"""ccat_ops_db: the operations database of the CCAT data center (schema, ORM, migrations)."""

from __future__ import annotations

from .config import ConfigurationError, OpsDbSettings, load_settings, mask_url
from .db import init_ccat_ops_db, make_engine, session_scope

__all__ = [
    "ConfigurationError",
    "OpsDbSettings",
    "init_ccat_ops_db",
    "load_settings",
    "make_engine",
    "mask_url",
    "session_scope",
]
__version__ = "0.1.0"
