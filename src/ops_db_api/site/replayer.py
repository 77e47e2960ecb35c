"""The replayer: drains the observatory's buffer to the main API, in order, exactly once.

* Order: pending writes are sent in ``seq`` order (the order the observatory committed them
  for writes an instrument made one after another); a run of files goes as one bulk request.
* Exactly once: the main API is idempotent on the instruments' UUIDs. A write is marked
  replayed only after the main site answered 2xx; a crash in between resends it and the main
  site answers 200 (unchanged) - it never holds a file twice.
* A bulk refused for its content (409/422/413) is resent file by file, so only the files the
  main site refuses are parked, each with its reason; the rest go through.
* While the main site is unreachable (connection errors, 5xx, 429) or refuses the replayer's
  token (401/403), nothing is parked: the replayer waits with exponential backoff and jitter
  and records the error for ``ccat-api buffer status``.
* A 400/404/409/413/422 refuses the data only when its body is the main API's own error
  document (``{"detail": "...", "errors": [...]}``); a 404 or 400 also needs a message of its
  own (``"executed obs unit … not found"``, not the bare reason phrase the API answers for a
  route it does not have). One that is not - a proxy's HTML page, a bare
  ``{"detail": "Not Found"}``, ``CCAT_API_MAIN_URL`` with a wrong path prefix - is a link or
  configuration error: nothing is parked, the replayer backs off and says so. A proxy's 413
  on a bulk (its body-size limit, not the API's) splits the bulk in halves down to single
  files; a single file a proxy still refuses waits, with that error, until the proxy is fixed.
* One replayer at a time: a PostgreSQL advisory lock on the buffer database.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx
from sqlalchemy import text

from .buffer import REPLAYER_LOCK_KEY, BufferedItem, SiteBuffer

log = logging.getLogger("ops_db_api.site.replayer")

API = "/api/v1"
#: Statuses with which the main API refuses the data itself: the write is parked.
CONTENT_REFUSALS = {400, 404, 409, 413, 422}
#: ... but only if the body is the API's own answer about the data: these two are also what a
#: proxy, or a URL that does not reach the API's routes, answers.
ROUTING_STATUSES = {400, 404}


class LinkDownError(Exception):
    """The main site cannot take writes right now (unreachable, 5xx, 429, token refused)."""


class LinkConfigError(LinkDownError):
    """A 404/400 that is not the main API's answer about the data: the URL or a proxy."""


class ReplayerBusyError(Exception):
    """Another replayer holds the buffer's lock."""


@dataclass
class ReplayRound:
    """What one pass over the buffer did."""

    replayed: int = 0
    parked: int = 0
    requests: int = 0
    error: str | None = None


def _reason(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text[:500]}"
    detail = body.get("detail") if isinstance(body, dict) else body
    msgs = []
    for e in (body.get("errors") or []) if isinstance(body, dict) else []:
        msgs.append(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}")
    extra = f" ({'; '.join(msgs)})" if msgs else ""
    return f"HTTP {resp.status_code}: {detail}{extra}"[:2000]


def _api_error_document(resp: httpx.Response) -> dict[str, Any] | None:
    """The main API's error body (JSON ``{"detail": str, "errors": list}``), or None."""
    if "json" not in resp.headers.get("content-type", ""):
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if not isinstance(body.get("detail"), str) or not isinstance(body.get("errors"), list):
        return None
    return body


def refuses_content(resp: httpx.Response) -> bool:
    """True if ``resp`` is the main API refusing the data sent (the write is parked).

    The status must be one of :data:`CONTENT_REFUSALS` and the body the API's error document
    (``detail`` and ``errors``): a proxy's HTML 409/413/422, or its own JSON, says nothing
    about the data. A 404 or 400 also needs a message of its own: for an unknown route the API
    answers the bare reason phrase (``{"detail": "Not Found", "errors": []}``) - a wrong
    ``CCAT_API_MAIN_URL``, not the data.
    """
    if resp.status_code not in CONTENT_REFUSALS:
        return False
    body = _api_error_document(resp)
    if body is None:
        return False
    if resp.status_code not in ROUTING_STATUSES:
        return True
    return str(body["detail"]).strip().lower() != HTTPStatus(resp.status_code).phrase.lower()


def _link_error(resp: httpx.Response) -> LinkDownError:
    """The error for an answer that is not a refusal of the data."""
    if resp.status_code in CONTENT_REFUSALS:
        return _not_the_api(resp)
    return LinkDownError(_reason(resp))


def _not_the_api(resp: httpx.Response) -> LinkConfigError:
    body = " ".join(resp.text[:200].split())
    return LinkConfigError(
        f"HTTP {resp.status_code} from {resp.request.method} {resp.request.url} is not the main "
        f"API's answer ({body or 'empty body'}): check CCAT_API_MAIN_URL (path prefix) and any "
        "proxy on the way (for a 413, its request body-size limit); nothing parked, retrying"
    )


class Replayer:
    """Sends buffered writes to the main API over HTTP."""

    def __init__(
        self,
        buffer: SiteBuffer,
        main_url: str,
        main_token: str,
        *,
        batch_size: int = 1000,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        timeout_s: float = 60.0,
        retention_s: float = 7 * 86400,
        on_sent: Callable[[int, int], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retention_s = retention_s
        self.on_sent = on_sent
        self.client = httpx.Client(
            base_url=main_url.rstrip("/"),
            headers={"Authorization": f"Bearer {main_token}"},
            timeout=timeout_s,
        )
        self.failures = 0
        self.stats = {"requests": 0, "replayed": 0, "parked": 0, "link_errors": 0}

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    @contextmanager
    def lock(self, wait_until: threading.Event | None = None) -> Iterator[None]:
        """Hold the one-replayer lock (PostgreSQL advisory lock) for the block.

        Without ``wait_until`` a held lock raises :class:`ReplayerBusyError` at once; with it,
        the lock is tried every few seconds until it is free or the event is set.
        """
        if not self.buffer.is_postgresql:
            yield
            return
        with self.buffer.engine.connect() as conn:
            while True:
                got = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": REPLAYER_LOCK_KEY})
                conn.commit()
                if got:
                    break
                if wait_until is None or wait_until.is_set():
                    raise ReplayerBusyError("another replayer is draining this buffer")
                log.info("another replayer holds the buffer; waiting")
                wait_until.wait(2.0)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": REPLAYER_LOCK_KEY})
                conn.commit()

    # --- one pass ------------------------------------------------------------------------

    def drain_once(self) -> ReplayRound:
        """Send pending writes until the buffer is empty or the main site stops answering."""
        done = ReplayRound()
        try:
            while True:
                batch = self.buffer.pending(self.batch_size)
                if not batch:
                    break
                self._send_batch(batch, done)
        except LinkDownError as exc:
            done.error = str(exc)
            self.stats["link_errors"] += 1
            self.buffer.record_error(done.error)
            if isinstance(exc, LinkConfigError):
                log.error(
                    "main site URL or a proxy answers instead of the main API; nothing parked",
                    extra={"error": done.error},
                )
            else:
                log.warning("main site unreachable", extra={"error": done.error})
        return done

    def _send_batch(self, batch: Sequence[BufferedItem], done: ReplayRound) -> None:
        i = 0
        while i < len(batch):
            item = batch[i]
            if item.kind == "file":
                j = i
                while j < len(batch) and batch[j].kind == "file":
                    j += 1
                self._send_files(batch[i:j], done)
                i = j
            else:
                self._send_single(item, done)
                i += 1

    def _post(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            resp = self.client.request(method, API + path, json=body)
        except httpx.HTTPError as exc:
            raise LinkDownError(f"{type(exc).__name__}: {exc}") from exc
        self.stats["requests"] += 1
        if resp.status_code >= 500 or resp.status_code in (401, 403, 408, 429):
            raise LinkDownError(_reason(resp))
        return resp

    def _replayed(self, items: Sequence[BufferedItem], done: ReplayRound) -> None:
        self.buffer.mark_replayed([it.seq for it in items])
        done.replayed += len(items)
        self.stats["replayed"] += len(items)
        if self.on_sent:
            self.on_sent(len(items), 0)

    def _park(self, item: BufferedItem, resp: httpx.Response, done: ReplayRound) -> None:
        self.buffer.park(item.seq, _reason(resp), resp.status_code)
        done.parked += 1
        self.stats["parked"] += 1
        if self.on_sent:
            self.on_sent(0, 1)

    def _send_files(self, files: Sequence[BufferedItem], done: ReplayRound) -> None:
        resp = self._post("POST", "/raw_data_files/bulk", {"files": [f.payload for f in files]})
        done.requests += 1
        if resp.is_success:
            self._replayed(files, done)
            log.info("replayed files", extra={"count": len(files), "first_seq": files[0].seq})
            return
        if not refuses_content(resp):
            if resp.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and len(files) > 1:
                # a proxy's body-size limit (the API's own 413 is a refusal, handled below):
                # smaller requests get through it; a single file it refuses is a link error
                half = len(files) // 2
                log.warning(
                    "bulk refused with a 413 that is not the main API's; splitting it",
                    extra={"count": len(files), "first_seq": files[0].seq},
                )
                self._send_files(files[:half], done)
                self._send_files(files[half:], done)
                return
            raise _link_error(resp)
        log.warning(
            "bulk replay refused; isolating file by file",
            extra={"count": len(files), "status_code": resp.status_code},
        )
        for f in files:
            self._send_single(f, done)

    def _send_single(self, item: BufferedItem, done: ReplayRound) -> None:
        if item.kind == "file":
            resp = self._post("POST", "/raw_data_files", item.payload)
        elif item.kind == "eou_start":
            resp = self._post("POST", "/executed_obs_units/start", item.payload)
        elif item.kind == "eou_finish":
            resp = self._post("PUT", f"/executed_obs_units/{item.item_id}/finish", item.payload)
        else:  # pragma: no cover - the API writes only the kinds above
            raise ValueError(f"unknown buffered kind {item.kind!r} (seq {item.seq})")
        done.requests += 1
        if resp.is_success:
            self._replayed([item], done)
        elif refuses_content(resp):
            self._park(item, resp, done)
        else:
            raise _link_error(resp)

    # --- loop ------------------------------------------------------------------------------

    def backoff_s(self) -> float:
        """The next wait after ``failures`` failed passes in a row: exponential, jittered."""
        base = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, self.failures - 1))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret

    def follow(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        """Drain forever (until ``stop``): poll every ``idle_s``, back off while down."""
        last_prune = 0.0
        while not stop.is_set():
            try:
                done = self.drain_once()
            except Exception as exc:  # the buffer database itself failed: retry later
                done = ReplayRound(error=f"buffer: {type(exc).__name__}: {exc}")
                log.error("replay pass failed", extra={"error": done.error})
            if done.error:
                self.failures += 1
                wait = self.backoff_s()
                log.info("backing off", extra={"wait_s": round(wait, 2), "failures": self.failures})
            else:
                self.failures = 0
                wait = idle_s
            if time.monotonic() - last_prune > 600:
                last_prune = time.monotonic()
                try:
                    self.buffer.prune_replayed(self.retention_s)
                except Exception as exc:  # pruning is housekeeping; never stop for it
                    log.error("prune failed", extra={"error": str(exc)})
            stop.wait(wait)
