"""Request body limits: a pure ASGI middleware that refuses oversized and too deeply nested bodies.

Two limits, both checked before any route (or JSON parser) sees the body:

* ``CCAT_API_MAX_BODY_BYTES``: a body larger than this answers **413**. A ``Content-Length``
  over the limit is refused without reading a byte; a chunked body (no ``Content-Length``) is
  read only up to the limit and then refused.
* ``CCAT_API_MAX_JSON_DEPTH``: a body whose JSON arrays/objects nest deeper than this answers
  **422** (``loc: ["body"]``). Python's JSON parser recurses once per level, so a body of a
  few hundred thousand ``[`` would otherwise end in a ``RecursionError`` (a 500) or worse.
  The depth is counted by a scanner that skips string contents, without building anything.

The common case (a small filing request arriving in one piece with fewer brackets than the
depth limit) passes straight through: two ``bytes.count`` calls and no copy.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: A JSON string (with escapes) or one bracket; strings are matched so that brackets inside
#: them are skipped.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def json_depth(body: bytes, stop_at: int | None = None) -> int:
    """The deepest nesting of arrays/objects in ``body`` (0 for a scalar or no JSON).

    Does not validate the JSON (the parser does that later); unbalanced closers are ignored.
    Stops early once ``stop_at`` is exceeded.
    """
    depth = deepest = 0
    for match in _TOKENS.finditer(body):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_at is not None and deepest > stop_at:
                    return deepest
        elif first != 0x22 and depth > 0:  # a closing bracket (0x22 is '"': a string)
            depth -= 1
    return deepest


def _error(status: int, detail: str, msg: str, kind: str) -> tuple[bytes, int]:
    body = {"detail": detail, "errors": [{"loc": ["body"], "msg": msg, "type": kind}]}
    return json.dumps(body).encode(), status


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413) or nested deeper than ``max_depth`` (422)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._refuse(send, *self._too_large(f"Content-Length {length}"))
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if not chunks and not more:
                # Fast path: the whole body in one message (nearly every request).
                body = chunk
                break
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, *self._too_large(f"more than {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not more:
                body = b"".join(chunks)
                break
        if len(body) > self.max_bytes:
            await self._refuse(send, *self._too_large(f"{len(body)} bytes"))
            return
        # Depth can only exceed the limit if there are more opening brackets than the limit.
        if body.count(b"[") + body.count(b"{") > self.max_depth:
            depth = json_depth(body, stop_at=self.max_depth)
            if depth > self.max_depth:
                await self._refuse(
                    send,
                    *_error(
                        422,
                        f"request body nests JSON deeper than {self.max_depth} levels "
                        "(CCAT_API_MAX_JSON_DEPTH)",
                        f"nesting depth over {self.max_depth}",
                        "json_too_deep",
                    ),
                )
                return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> tuple[bytes, int]:
        return _error(
            413,
            f"request body too large: {what}; the limit is {self.max_bytes} bytes "
            "(CCAT_API_MAX_BODY_BYTES)",
            f"larger than {self.max_bytes} bytes",
            "body_too_large",
        )

    @staticmethod
    async def _refuse(send: Send, body: bytes, status: int) -> None:
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # the unread rest of the body makes the connection unusable for another request
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or ()
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
