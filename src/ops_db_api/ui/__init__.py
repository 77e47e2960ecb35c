"""The status page (``/ui``): server-rendered HTML over the same data and auth as the API."""

from .router import router

__all__ = ["router"]
