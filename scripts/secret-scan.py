#!/usr/bin/env python3
"""Scan for secrets: the working tree, the whole git history, and every layer of images.

    scripts/secret-scan.py --tree                 # files git tracks or would track
    scripts/secret-scan.py --history              # every line ever added (git log -p --all)
    scripts/secret-scan.py --image NAME [...]     # every file of every layer (docker save)
    scripts/secret-scan.py --tree --history --image ccat-data-center:0.1.0 --json

What counts as a secret (rules below): private keys, AWS access keys and secret keys, API
tokens of this project (``ccat_`` + 43 characters) and of common services, passwords inside
URLs, and quoted values assigned to names like ``password``/``secret``/``token`` that look
random. Placeholders (``${VAR}``, ``<password>``, ``changeme``, AWS's documented example keys)
are not secrets. A line that must contain a matching text on purpose says so with the
comment ``secret-scan: allow``.

Reads only (``git ls-files``, ``git log``, ``docker save``); needs no third-party package.
Exit status: 0 nothing found, 1 findings (listed), 2 the scan itself could not run.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOW_PRAGMA = "secret-scan: allow"
MAX_FILE_BYTES = 2 * 2**20  # bigger files are data, not configuration

#: Values that are placeholders or published examples, never real secrets.
PLACEHOLDERS = {
    "akiaiosfodnn7example",
    "wjalrxutnfemi/k7mdeng/bpxrficyexamplekey",
    "password",
    "passwd",
    "secret",
    "changeme",
    "change-me",
    "example",
    "xxx",
    "xxxxxxxx",
    "redacted",
    "hunter2",
    "tiger",  # scott/tiger, the classic example login
    "testing",
    "test",
    "foobar",
    "dummy",
}

#: Known false positives: (path glob, rule) -> why the match is not a secret. Paths are those
#: of the working tree (history findings match on the file part after ``commit:``).
ALLOWED: dict[tuple[str, str], str] = {
    ("tests/test_cli.py", "password-in-url"): "made-up credentials: the CLI must mask them",
    ("tests/test_config.py", "password-in-url"): "made-up credentials: mask_url's own test",
}

#: The project's own top-level packages (always scanned with every rule, also in images).
OWN_PACKAGES = ("ccat_ops_db", "ops_db_api", "data_transfer", "ccat_dc", "ccat_data_center")

#: Folders of third-party code that are neither the project's nor committed by it.
SKIP_PARTS = frozenset({"node_modules", ".venv", "__pycache__", ".git"})

#: (rule name, pattern); group "v" (when present) is the secret value itself.
RULES: list[tuple[str, re.Pattern[str]]] = [
    (
        "private-key",
        re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY"),
    ),
    ("aws-access-key-id", re.compile(r"\b(?P<v>(?:AKIA|ASIA)[0-9A-Z]{16})\b")),
    (
        "aws-secret-access-key",
        re.compile(
            r"(?i)aws.{0,20}secret.{0,20}?[:=]\s*[\"']?(?P<v>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
        ),
    ),
    ("ccat-api-token", re.compile(r"\b(?P<v>ccat_[A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")),
    ("github-token", re.compile(r"\b(?P<v>gh[pousr]_[A-Za-z0-9]{36,})")),
    ("slack-token", re.compile(r"\b(?P<v>xox[abprs]-[A-Za-z0-9-]{10,})")),
    ("pypi-token", re.compile(r"\b(?P<v>pypi-AgE[A-Za-z0-9_-]{50,})")),
    (
        "password-in-url",
        re.compile(r"\b[a-z][a-z0-9+.-]{1,20}://[^\s/:@'\"<>]{1,64}:(?P<v>[^\s/@'\"<>]{1,128})@"),
    ),
    (
        "assigned-secret",
        re.compile(
            r"(?i)\b[a-z_]*(?:password|passwd|secret|api_?key|access_?key|token)[a-z_]*"
            r"\s*[:=]\s*[\"'](?P<v>[^\"'\s]{12,})[\"']"
        ),
    ),
]


@dataclass
class Finding:
    """One suspected secret: where it is and which rule matched (the value is masked)."""

    where: str
    line: int
    rule: str
    excerpt: str


def entropy(value: str) -> float:
    """Shannon entropy of ``value`` in bits per character."""
    counts = {c: value.count(c) for c in set(value)}
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_random(value: str) -> bool:
    """Upper and lower case letters and digits, with high entropy: a generated token."""
    return (
        any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and any(c.isdigit() for c in value)
        and entropy(value) >= 4.0
    )


def secret_like(value: str) -> bool:
    """A quoted value that could be a password or key: varied characters, and not a name,
    a type or a path (``kubernetes:core/v1:Secret``, ``app.settings.token``)."""
    if entropy(value) < 3.5:
        return False
    return not re.fullmatch(r"[A-Za-z0-9_.@-]+(?:[:/][A-Za-z0-9_.@-]+)+|[a-z_.-]+", value)


def allowed(where: str, rule: str) -> bool:
    """Whether a finding at ``where`` of ``rule`` is a known false positive (:data:`ALLOWED`)."""
    path = where.split(":", 1)[1] if re.match(r"^[0-9a-f]{12}:", where) else where
    return any(fnmatch.fnmatch(path, glob) and r == rule for glob, r in ALLOWED)


def is_placeholder(value: str) -> bool:
    """A template variable, a placeholder word or a published example value."""
    v = value.strip().lower()
    if not v or v[0] in "$<{%*" or v.endswith(("}", ">")) or "..." in v or "${" in v:
        return True
    return v in PLACEHOLDERS or v.strip("*x.") == "" or "example" in v


def mask(text: str, value: str | None) -> str:
    line = text.strip()
    if value:
        shown = value[:4] + "…" if len(value) > 8 else "…"
        line = line.replace(value, shown)
    return line[:160]


#: Rules that match on shape alone (high confidence); the others are heuristics.
EXACT_RULES = frozenset(
    {"private-key", "aws-access-key-id", "ccat-api-token", "github-token", "slack-token"}
    | {"pypi-token"}
)


#: What every match of the exact rules / of any rule contains (a quick pre-filter).
ANY_EXACT_RULE = re.compile(r"PRIVATE KEY|AKIA|ASIA|ccat_|gh[pousr]_|xox[abprs]-|pypi-AgE")
ANY_RULE = re.compile(ANY_EXACT_RULE.pattern + r"|://|(?i:aws|passw|secret|key|token)")


def scan_text(
    text: str, where: str, first_line: int = 1, heuristics: bool = True
) -> Iterator[Finding]:
    """Findings in ``text`` (line numbers from ``first_line``); ``heuristics=False`` applies
    only the exact rules (third-party packages, whose docs are full of example URLs)."""
    # One pass of a cheap pattern over the whole text first: most files hold no candidate.
    if not (ANY_RULE if heuristics else ANY_EXACT_RULE).search(text):
        return
    for offset, line in enumerate(text.splitlines()):
        if ALLOW_PRAGMA in line or len(line) > 10_000:
            continue
        for rule, pattern in RULES:
            if not heuristics and rule not in EXACT_RULES:
                continue
            for match in pattern.finditer(line):
                if rule == "private-key" and re.search(r"PRIVATE KEY[^<]*<|\.\.\.", line):
                    continue  # "-----BEGIN PRIVATE KEY-----<your key here>": a placeholder
                value = match.groupdict().get("v")
                if value is not None and is_placeholder(value):
                    continue
                if rule == "assigned-secret" and value is not None and not secret_like(value):
                    continue
                if rule == "password-in-url" and value is not None and len(value) < 3:
                    continue
                if rule == "ccat-api-token" and value is not None and not looks_random(value[5:]):
                    continue  # e.g. a queue name like ccat_primecam_raw_data_..._creation
                if allowed(where, rule):
                    continue
                yield Finding(where, first_line + offset, rule, mask(line, value))


def looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


def scan_bytes(data: bytes, where: str, heuristics: bool = True) -> Iterator[Finding]:
    if len(data) > MAX_FILE_BYTES or looks_binary(data):
        return
    yield from scan_text(data.decode("utf-8", "replace"), where, heuristics=heuristics)


def third_party(path: str) -> bool:
    """A file of an installed third-party package in an image (site-/dist-packages, not ours).

    Such files are the published files of the pinned wheels (requirements.lock has their
    hashes): they are scanned with the exact rules only, since their documentation is full of
    example URLs like ``postgresql://scott:tiger@localhost`` (secret-scan: allow).
    """
    if "/site-packages/" not in path and "/dist-packages/" not in path:
        return False
    package = re.split(r"/(?:site|dist)-packages/", path, maxsplit=1)[1].split("/")[0]
    return not package.startswith(OWN_PACKAGES)


def git(*args: str) -> str:
    """Run a read-only git command in the repository; its standard output."""
    res = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, errors="replace"
    )
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def scan_tree() -> tuple[list[Finding], int]:
    """Every file git tracks or would track (not ignored) in the working tree."""
    files = [f for f in git("ls-files", "-co", "--exclude-standard", "-z").split("\0") if f]
    findings: list[Finding] = []
    scanned = 0
    for name in files:
        path = ROOT / name
        if SKIP_PARTS.intersection(Path(name).parts):
            continue
        if not path.is_file() or path.is_symlink():
            continue
        scanned += 1
        findings.extend(scan_bytes(path.read_bytes(), name))
    return findings, scanned


def scan_history() -> tuple[list[Finding], int]:
    """Every line added in any commit of any branch (``git log -p --all``)."""
    log = git("log", "-p", "--all", "--no-color", "--no-ext-diff", "-U0", "--format=commit %H")
    findings: list[Finding] = []
    commit = path = ""
    commits = 0
    for raw in log.splitlines():
        if raw.startswith("commit "):
            commit, commits = raw.split()[1][:12], commits + 1
        elif raw.startswith("+++ "):
            path = raw[6:] if raw.startswith("+++ b/") else raw[4:]
        elif raw.startswith("+") and not raw.startswith("+++"):
            for f in scan_text(raw[1:], f"{commit}:{path}"):
                f.line = 0  # a diff line: the commit and file say where
                findings.append(f)
    return findings, commits


def _layer_members(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    for member in tar:
        if not member.isfile() or member.size > MAX_FILE_BYTES:
            continue
        fh = tar.extractfile(member)
        if fh is not None:
            yield member.name, fh.read()


def image_layers(image: str, workdir: Path) -> Iterator[tuple[str, tarfile.TarFile]]:
    """(layer id, open tar) of every layer of ``image``, from ``docker save``."""
    archive = workdir / "image.tar"
    res = subprocess.run(["docker", "save", "-o", str(archive), image], capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"docker save {image} failed: {res.stderr.decode().strip()}")
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for layer in manifest[0]["Layers"]:
            blob = outer.extractfile(layer)
            assert blob is not None
            data = blob.read()
            # layers are plain tars (docker) or gzip-compressed (some OCI exports)
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as inner:
                yield layer, inner


def scan_image(image: str) -> tuple[list[Finding], int]:
    """Every regular file of every layer of ``image`` (also files later layers delete)."""
    findings: list[Finding] = []
    files = 0
    with tempfile.TemporaryDirectory(prefix="secret-scan-") as tmp:
        for layer, tar in image_layers(image, Path(tmp)):
            short = layer.replace("blobs/sha256/", "")[:12]
            for name, data in _layer_members(tar):
                files += 1
                where = f"{image}@{short}:/{name}"
                findings.extend(scan_bytes(data, where, heuristics=not third_party(name)))
    return findings, files


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="store_true", help="scan the working tree")
    parser.add_argument("--history", action="store_true", help="scan the whole git history")
    parser.add_argument("--image", action="append", default=[], help="scan an image's layers")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not (args.tree or args.history or args.image):
        parser.error("nothing to scan: give --tree, --history and/or --image NAME")
    findings: list[Finding] = []
    summary: list[str] = []
    try:
        if args.tree:
            found, n = scan_tree()
            findings += found
            summary.append(f"working tree: {n} files, {len(found)} findings")
        if args.history:
            found, n = scan_history()
            findings += found
            summary.append(f"git history: {n} commits, {len(found)} findings")
        for image in args.image:
            found, n = scan_image(image)
            findings += found
            summary.append(f"image {image}: {n} files in its layers, {len(found)} findings")
    except (RuntimeError, OSError, tarfile.TarError, KeyError) as exc:
        print(f"secret-scan: cannot scan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"summary": summary, "findings": [asdict(f) for f in findings]}))
    else:
        for f in findings:
            at = f"{f.where}:{f.line}" if f.line else f.where
            print(f"{at}: {f.rule}: {f.excerpt}")
        for line in summary:
            print(f"secret-scan: {line}")
        print(f"secret-scan: {'FOUND ' + str(len(findings)) if findings else 'no'} secrets")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
