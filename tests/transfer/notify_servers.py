"""Real receivers for the notification tests, each in its own process on 127.0.0.1.

* ``smtp``: an SMTP server (aiosmtpd) that stores every message it accepts as
  ``<out>/<n>.eml``. With ``--user``/``--password`` it offers AUTH and refuses mail from a
  client that did not log in (530). With ``--tls starttls`` it offers STARTTLS, with
``--tls ssl`` it speaks TLS from the first byte; ``--cert``/``--key`` are its certificate
(``make_certificates`` writes a test CA and a certificate it signed for 127.0.0.1).
* ``webhook``: an HTTP server that stores every POST body as ``<out>/<n>.json`` and answers
  204; the first ``--fail-first`` requests get 503 instead (and are not stored).

Run: ``python -m tests.transfer.notify_servers smtp --port P --out DIR [--user U --password W]
[--tls starttls|ssl --cert C --key K]``
or ``... webhook --port P --out DIR [--fail-first N]``. The fixtures in test_notify.py start
them and wait for the port.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import itertools
import signal
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """Write a test CA and a server certificate it signed for 127.0.0.1 (valid for a day).
    Returns (CA certificate, server certificate, server key), all PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("CCAT notify test CA"))
        .issuer_name(name("CCAT notify test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def serve_smtp(
    port: int,
    out: Path,
    user: str | None,
    password: str | None,
    tls: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> None:
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
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        kwargs["ssl_context" if tls == "ssl" else "tls_context"] = context
        if tls == "starttls":
            kwargs["require_starttls"] = True
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
    parser.add_argument("--tls", choices=("starttls", "ssl"))
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kind == "smtp":
        serve_smtp(args.port, args.out, args.user, args.password, args.tls, args.cert, args.key)
    else:
        serve_webhook(args.port, args.out, args.fail_first)


if __name__ == "__main__":
    main()
