"""Fixtures of the chaos suite: the real servers of the transfer tests (tests/transfer)."""

from tests.transfer.servers import s3_server, sshd  # noqa: F401
from tests.transfer.stack import redis_server  # noqa: F401
