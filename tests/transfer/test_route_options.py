"""Route options: the names each method's mover reads, checked when the topology is loaded
(tests/test_seed.py) and again when a transfer starts from a route stored before that check.

The first test reads the movers' source: a new option a mover reads must be listed in
``ccat_ops_db.route_options`` (or the loader would reject it), and a listed name must be read
by some mover (or a typo there would pass the check)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import data_transfer.movers as movers_pkg
from ccat_ops_db import models as m
from ccat_ops_db.enums import Status, TransferMethod
from ccat_ops_db.route_options import ROUTE_OPTIONS, route_option_problems
from data_transfer.errors import ConfigurationError
from data_transfer.settings import load_transfer_settings

from .stack import Stack, passes
from .test_pipeline import check_archive_bytes, ctx_for, run_until_quiet

MOVERS = Path(movers_pkg.__file__).parent
#: ``opts.get("name"``, ``options.get("name"``, ``flag("name"`` in a mover's source
READ = re.compile(r"""(?:\bget|\bflag)\(\s*["']([a-z_]+)["']""")


def _read_in(*files: str) -> set[str]:
    return {n for f in files for n in READ.findall((MOVERS / f).read_text())}


def test_every_option_a_mover_reads_is_listed_for_its_method_and_no_other() -> None:
    read = {
        TransferMethod.LOCAL: _read_in("local.py"),
        TransferMethod.RSYNC: _read_in("rsync.py"),
        # bbcp builds on the ssh parts of rsync.py (SshConfig, SshFileMover), not on
        # RsyncMover, whose own options are these
        TransferMethod.BBCP: _read_in("bbcp.py")
        | (
            _read_in("rsync.py")
            - {"timeout", "bwlimit", "rsync_path", "remote_rsync_path"}
            - {"partial_dir"}
        ),
        TransferMethod.S3: _read_in("s3.py"),
    }
    for method, names in read.items():
        assert names, f"no option reads found in the {method.value} mover: the pattern is stale"
        unlisted, unread = (
            names - ROUTE_OPTIONS[method].keys(),
            ROUTE_OPTIONS[method].keys() - names,
        )
        assert not unlisted, f"{method.value} mover reads {sorted(unlisted)}: list them"
        assert not unread, f"{method.value} routes list {sorted(unread)}: no mover reads them"


def test_unknown_names_get_a_suggestion_or_the_method_that_knows_them() -> None:
    assert route_option_problems("rsync", {"bwlimit": "50m", "ssh_timeout": 30}) == []
    assert route_option_problems(TransferMethod.S3, None) == []
    problems = dict(
        route_option_problems("rsync", {"bwlimt": "50m", "streams": 8, "colour": "blue"})
    )
    assert problems == {
        "bwlimt": "unknown option 'bwlimt' for rsync routes; did you mean 'bwlimit'?",
        "streams": "unknown option 'streams' for rsync routes (it is an option of bbcp routes)",
        "colour": problems["colour"],
    }
    assert problems["colour"].startswith("unknown option 'colour' for rsync routes (known: ")
    assert "partial_dir" in problems["colour"]


def test_values_are_checked_by_kind() -> None:
    good = {
        "streams": 8,
        "window": "=8M",
        "port_range": "5031:5040",
        "max_rate": 100,
        "compress": True,
        "bbcp_checksum": "c32",
        "ssh_options": "Ciphers=aes128-gcm@openssh.com",
        "extra_args": ["-D"],
        "ssh_timeout": 2.5,
        "strict_host_key_checking": "accept-new",
    }
    assert route_option_problems("bbcp", good) == []
    bad = {
        "streams": 0,
        "window": "8 MB",
        "verbose": "yes",
        "extra_args": "-D",  # a string would go to bbcp one character at a time
        "compress": 12,
        "bbcp_checksum": "sha256",
        "connect_timeout": True,
        "ssh_options": [1],
    }
    problems = dict(route_option_problems("bbcp", bad))
    assert problems == {
        "streams": "must be a whole number >= 1 (got 0)",
        "window": "must be a size like 8M or =8M (got '8 MB')",
        "verbose": "must be true or false (got 'yes')",
        "extra_args": "must be a list of strings (got '-D')",
        "compress": "must be true, false or a level 0-9 (got 12)",
        "bbcp_checksum": "must be one of 'md5', 'a32', 'c32' (got 'sha256')",
        "connect_timeout": "must be a whole number of seconds >= 1 (got True)",
        "ssh_options": "must be a list of strings (got [1])",
    }
    assert dict(route_option_problems("s3", {"part_size": 1 << 20, "addressing_style": "x"})) == {
        "part_size": "must be a whole number of bytes >= 5242880 (got 1048576)",
        "addressing_style": "must be one of 'auto', 'path', 'virtual' (got 'x')",
    }
    assert route_option_problems("rsync", {"partial_dir": "a/b"}) == [
        ("partial_dir", "must be a plain folder name (got 'a/b')")
    ]


def test_a_stored_route_with_an_unknown_option_fails_its_transfer_with_the_reason(
    stack: Stack,
) -> None:
    """A database seeded before the loader checked options: the transfer does not run without
    the option; it fails at once (no retry can help) with a reason naming the route."""
    stack.file_observation(files=2, seed=91)
    ctx = ctx_for(stack, max_retries=3)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    with Session(stack.engine) as s, s.begin():
        route = s.scalar(
            select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_cologne")
        )
        assert route.method == TransferMethod.LOCAL  # the test stack's routes
        route.options = {"overwrite": "no", "chunk_sise": 4 << 20}
    assert passes(ctx, "transfers", "transfers", "transfers") == ["failed"]
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert (t.status, t.retry_count) == (Status.FAILED, 1), t.failure_reason
        assert t.failure_reason.startswith(
            "ConfigurationError: route ccat_to_cologne: options.overwrite: must be true or "
            "false (got 'no'); options.chunk_sise: unknown option 'chunk_sise' for local "
            "routes; did you mean 'chunk_size'? (correct routes[].options in the topology file"
        ), t.failure_reason
        copies = s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_transfer_package_id == t.data_transfer_package_id,
                m.PhysicalCopy.data_location_id == t.destination_location_id,
            )
        ).all()
        assert copies == []


def test_the_s3_options_setting_reaches_the_archive_and_a_bad_one_names_the_variable(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archiving has no route: ``CCAT_TRANSFER_S3_OPTIONS`` is where its storage class, part
    size or timeouts are set. Every archived object carries the storage class asked for."""
    ctx = ctx_for(stack, s3_options={"storage_class": "STANDARD_IA", "part_size": 5 << 20})
    stack.file_observation(files=3, seed=92)
    run_until_quiet(ctx)
    assert check_archive_bytes(stack) == 6  # 3 files, 2 archive sites
    client = stack.s3.client()
    keys = 0
    for bucket in stack.buckets.values():
        for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            head = client.head_object(Bucket=bucket, Key=obj["Key"])
            assert head.get("StorageClass") == "STANDARD_IA", (obj["Key"], head)
            keys += 1
    assert keys >= 4  # a package and its metadata sidecar in each archive

    monkeypatch.setenv("CCAT_TRANSFER_S3_OPTIONS", '{"storage_clas": "GLACIER_IR"}')
    with pytest.raises(ConfigurationError) as info:
        load_transfer_settings()
    assert str(info.value) == (
        "invalid transfer settings: CCAT_TRANSFER_S3_OPTIONS: storage_clas: unknown option "
        "'storage_clas' for s3 routes; did you mean 'storage_class'?"
    )
    monkeypatch.setenv("CCAT_TRANSFER_S3_OPTIONS", "storage_class=GLACIER_IR")
    with pytest.raises(ConfigurationError, match=r"CCAT_TRANSFER_S3_OPTIONS: not valid JSON"):
        load_transfer_settings()
