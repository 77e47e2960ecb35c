"""Real receivers for the notification tests, each in its own process on 127.0.0.1.

* ``smtp``: an SMTP server (aiosmtpd) that stores every message it accepts as
  ``<out>/<n>.eml``. With ``--user``/``--password`` it offers AUTH and refuses mail from a
  client that did not log in (530).
* ``webhook``: an HTTP server that stores every POST body as ``<out>/<n>.json`` and answers
  204; the first ``--fail-first`` requests get 503 instead (and are not stored).

Run: ``python -m tests.transfer.notify_servers smtp --port P --out DIR [--user U --password W]``
or ``... webhook --port P --out DIR [--fail-first N]``. The fixtures in test_notify.py start
them and wait for the port.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def serve_smtp(port: int, out: Path, user: str | None, password: str | None) -> None:
    """Run the SMTP receiver until SIGTERM."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    numbers = itertools.count(1)

    class Store:
        async def handle_MAIL(
            self, server: Any, session: Any, envelope: Any, address: str, options: Any
        ) -> str:
            if user and not session.authenticated:
                return "530 5.7.0 Authentication required"
            envelope.mail_from = address
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            n = next(numbers)
            (out / f"{n:03d}.eml").write_bytes(envelope.original_content)
            (out / f"{n:03d}.rcpt").write_text("\n".join(envelope.rcpt_tos))
            return "250 Message accepted"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == user
            and data.password.decode() == password
        )
        return AuthResult(success=ok)

    kwargs: dict[str, Any] = {}
    if user:
        kwargs = {"authenticator": authenticate, "auth_require_tls": False}
    controller = Controller(Store(), hostname=LOOPBACK, port=port, **kwargs)
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"smtp listening on {LOOPBACK}:{port}", flush=True)
    stop.wait()
    controller.stop()


def serve_webhook(port: int, out: Path, fail_first: int) -> None:
    """Run the webhook receiver until SIGTERM."""
    numbers = itertools.count(1)
    seen = itertools.count(1)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                attempt = next(seen)
                n = next(numbers) if attempt > fail_first else 0
            if n == 0:
                self.send_response(503, "Service Unavailable")
                self.end_headers()
                self.wfile.write(b"chat is down")
                return
            (out / f"{n:03d}.json").write_bytes(body)
            (out / f"{n:03d}.type").write_text(self.headers.get("Content-Type", ""))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(format % args + "\n")

    server = ThreadingHTTPServer((LOOPBACK, port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"webhook listening on {LOOPBACK}:{port}", flush=True)
    server.serve_forever()


def main() -> None:
    """Command line: which receiver, where."""
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("smtp", "webhook"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kind == "smtp":
        serve_smtp(args.port, args.out, args.user, args.password)
    else:
        serve_webhook(args.port, args.out, args.fail_first)


if __name__ == "__main__":
    main()
