"""``ccat-dc``: the whole CCAT data center running on one machine from wheels (the demo)."""

__version__ = "0.1.0"
