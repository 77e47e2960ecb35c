"""Fixtures of the transfer tests: real servers on 127.0.0.1 (see servers.py)."""

from tests.transfer.servers import (  # noqa: F401
    remote_disk,
    s3_client,
    s3_location,
    s3_server,
    sshd,
)
from tests.transfer.stack import redis_server, stack  # noqa: F401
