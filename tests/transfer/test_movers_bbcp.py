"""The bbcp mover: command builder, output parser, failure mapping, and the copy flow.

bbcp is not packaged for Debian and cannot be installed on these machines, so:

* the command builder and the output parser are unit-tested on sample output written from
  bbcp's sources and help text (progress ``bbcp: YYMMDD HH:MM:SS  NN% done; R MB/s``,
  summary ``File P created; N bytes at R MB/s``, ``bbcp: <strerror> <action> <path>`` errors);
* the copy flow (prepare, run, verify at the destination, rename, cleanup on mismatch) runs
  against a **stand-in bbcp**: a small script given as ``bbcp_path`` that copies a local file
  and prints bbcp-style lines. It is the only fake in the transfer tests and exists because
  the real program is unavailable; it stands in for bbcp alone (files, hashing, renames are
  real);
* ``test_real_bbcp_over_sshd`` runs the real program over the test sshd and is skipped,
  saying why, where bbcp is not installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from data_transfer.errors import (
    BBCPError,
    ChecksumMismatchError,
    ConfigurationError,
    NetworkError,
    StorageError,
)
from data_transfer.locations import LocationRef
from data_transfer.movers import BbcpMover, make_bbcp_command, parse_bbcp_output
from data_transfer.movers.bbcp import bbcp_failure, parse_progress_line, parse_rate
from data_transfer.movers.rsync import SshConfig
from tests.transfer.servers import SshServer

MB = 1 << 20

SAMPLE_OK = """\
bbcp: Creating /data/cologne/buffer/tp-0042.tar.part-bbcp
bbcp: 260114 03:12:45  12% done; 104.2 MB/s, avg 98.7 MB/s
bbcp: 260114 03:13:00  31% done; 111.9 MB/s, avg 104.0 MB/s
bbcp: 260114 03:13:15  50% done; 109.5 MB/s, avg 105.8 MB/s
bbcp: 260114 03:13:30  69% done; 1.1 GB/s, avg 250.0 MB/s
bbcp: 260114 03:13:45  100% done; 98.1 MB/s, avg 106.0 MB/s
File /data/cologne/buffer/tp-0042.tar.part-bbcp created; 5368709120 bytes at 106.3 MB/s
Source ccat-buffer.example using a final send window of 8388608
"""

SAMPLE_OLD_FORMAT = """\
bbcp: Creating /top/my.big.file
bbcp: At 140506 17:33:18 copy 20% complete; 89998.2 KB/s
bbcp: At 140506 17:33:28 copy 41% complete; 89910.4 KB/s
"""


# -- parser ---------------------------------------------------------------------------------------


def test_parse_progress_summary_and_rate() -> None:
    report = parse_bbcp_output(SAMPLE_OK)
    assert [p.percent for p in report.progress] == [12, 31, 50, 69, 100]
    assert report.progress[0].rate_bytes_per_s == pytest.approx(104.2 * MB)
    assert report.progress[0].avg_rate_bytes_per_s == pytest.approx(98.7 * MB)
    assert report.progress[3].rate_bytes_per_s == pytest.approx(1.1 * 1024 * MB)
    assert report.progress[0].at == "260114 03:12:45"
    assert len(report.files) == 1
    assert report.files[0].bytes == 5368709120
    assert report.files[0].path.endswith("tp-0042.tar.part-bbcp")
    assert report.rate_bytes_per_s == pytest.approx(106.3 * MB)
    assert report.bytes == 5368709120
    assert report.errors == []
    assert any("Creating" in m for m in report.messages)
    assert report.summary()["last_percent"] == 100


def test_parse_other_formats() -> None:
    old = parse_bbcp_output(SAMPLE_OLD_FORMAT)
    assert [p.percent for p in old.progress] == [20, 41]
    assert old.progress[0].rate_bytes_per_s == pytest.approx(89998.2 * 1024)
    assert old.rate_bytes_per_s == pytest.approx(89910.4 * 1024)
    logged = parse_progress_line("bbcp:  57% done; 12.0 MB/s")  # with -l the time is empty
    assert logged is not None and logged.percent == 57 and logged.at is None
    unknown_size = parse_progress_line("bbcp: 260114 03:13:45  not done; 3.5 KB/s")
    assert unknown_size is not None and unknown_size.percent is None
    assert parse_progress_line("bbcp: Creating /x") is None
    assert parse_rate("2.0", "G") == 2 * 1024 * MB
    assert parse_bbcp_output("").rate_bytes_per_s is None


@pytest.mark.parametrize(
    ("output", "rc", "kind", "retryable"),
    [
        (
            "bbcp: Creating /data/x.part-bbcp\n"
            "bbcp: Connection refused unable to connect to buffer.cologne port 5031\n"
            "bbcp: Unable to allocate more than 0 of 4 data streams.",
            1,
            BBCPError,
            True,
        ),
        ("bbcp: Accept timed out on port 5031\n", 1, BBCPError, True),
        (
            "bbcp: 260114 03:13:15  50% done; 9.5 MB/s\nbbcp: Broken pipe writing to net",
            128,
            BBCPError,
            True,
        ),
        (
            "ssh: connect to host buffer.cologne port 22: Connection timed out\n",
            255,
            NetworkError,
            True,
        ),
        ("ccat@buffer.cologne: Permission denied (publickey).\n", 255, StorageError, False),
        ("bbcp: Invalid window size - 5Q\n", 1, BBCPError, False),
        ("bash: line 1: bbcp: command not found\n", 127, BBCPError, False),
        (
            "bbcp: No such file or directory opening /data/ccat/buffer/missing.tar\n",
            2,
            BBCPError,
            False,
        ),
        ("bbcp: Not all data was transfered for /data/x.part-bbcp\n", 29, BBCPError, True),
        ("", -11, BBCPError, True),  # segmentation fault
    ],
)
def test_failure_mapping(output: str, rc: int, kind: type, retryable: bool) -> None:
    err = bbcp_failure(rc, output, "ccat/buffer:x -> cologne/buffer:x")
    assert type(err) is kind, err
    assert err.retryable is retryable
    assert "ccat/buffer:x" in str(err)
    if rc == -11:
        assert "signal 11" in str(err)


def test_errors_are_collected() -> None:
    report = parse_bbcp_output(
        "bbcp: Creating /x\nbbcp: Connection refused unable to connect to h port 5031\n"
        "bbcp: 260114 03:13:15  50% done; 9.5 MB/s\n"
    )
    assert report.errors == ["bbcp: Connection refused unable to connect to h port 5031"]
    assert report.network_failure and not report.fatal


# -- command builder ------------------------------------------------------------------------------


def remote(host: str = "buffer.cologne", port: int | None = 2222) -> LocationRef:
    return LocationRef(
        id=5,
        site="cologne",
        name="buffer",
        location_type="buffer",
        storage_type="disk",
        root_path="/data/cologne/buffer",
        host=host,
        ssh_user="ccat",
        ssh_port=port,
    )


def test_make_command_from_route_options() -> None:
    opts = {
        "streams": 8,
        "window": "=16M",
        "progress_interval": 30,
        "reverse": True,
        "port_range": "5031:5040",
        "max_rate": "500M",
        "bbcp_checksum": "md5",
        "identity_file": "/etc/ccat/id_ed25519",
        "known_hosts_file": "/etc/ccat/known_hosts",
    }
    argv = make_bbcp_command(
        "/data/ccat/buffer/tp.tar",
        "ccat@buffer.cologne:/data/cologne/buffer/tp.tar.part-bbcp",
        opts,
        dst_port=2222,
        dst_remote=True,
    )
    assert argv[0] == "bbcp"
    assert argv[-3:] == [
        "--",
        "/data/ccat/buffer/tp.tar",
        "ccat@buffer.cologne:/data/cologne/buffer/tp.tar.part-bbcp",
    ]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("-s") == "8" and value("-w") == "=16M" and value("-P") == "30"
    assert value("-Z") == "5031:5040" and value("-x") == "500M" and value("-E") == "md5"
    assert "-z" in argv and "-v" in argv
    assert "-a" in argv and "-k" in argv and "-f" not in argv  # resumable by default
    target = value("-T")
    assert target.startswith("ssh ") and "-p 2222" in target
    assert "-i /etc/ccat/id_ed25519" in target
    assert "UserKnownHostsFile=/etc/ccat/known_hosts" in target
    assert target.endswith("%I -l %U %H bbcp")
    assert "-S" not in argv  # the source is local

    plain = make_bbcp_command("/a", "/b", {"resume": False, "verbose": False})
    assert plain == ["bbcp", "-P", "15", "-f", "--", "/a", "/b"]


@pytest.mark.parametrize(
    "bad",
    [{"streams": 0}, {"window": "big"}, {"port_range": "5031-5040"}, {"bbcp_checksum": "sha256"}],
)
def test_make_command_rejects_bad_options(bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        make_bbcp_command("/a", "/b", bad)


def test_mover_builds_both_remote_ends() -> None:
    mover = BbcpMover({"streams": 4, "remote_bbcp_path": "/opt/bbcp/bin/bbcp"})
    src = remote("buffer.ccat", 22)
    argv = mover.build_command(src, "/data/a.tar", remote(), "/data/a.tar.part-bbcp")
    assert argv[-2:] == [
        "ccat@buffer.ccat:/data/a.tar",
        "ccat@buffer.cologne:/data/a.tar.part-bbcp",
    ]
    assert argv[argv.index("-S") + 1].endswith("%H /opt/bbcp/bin/bbcp")
    assert "-p 22" in argv[argv.index("-S") + 1]
    assert "-p 2222" in argv[argv.index("-T") + 1]
    ssh = SshConfig.from_options({})
    assert "BatchMode=yes" in " ".join(ssh.base_args())


def test_missing_bbcp_is_a_configuration_error(tmp_path: Path) -> None:
    src, dst = disk(tmp_path / "a"), disk(tmp_path / "b")
    (tmp_path / "a/f").write_bytes(b"x")
    mover = BbcpMover({"bbcp_path": str(tmp_path / "no-bbcp-here")})
    assert not mover.available()
    with pytest.raises(ConfigurationError, match="bbcp is not installed") as info:
        mover.copy(src, "f", dst, "f")
    assert not info.value.retryable
    assert not (tmp_path / "b/f").exists()


# -- the copy flow with a stand-in bbcp -----------------------------------------------------------

STAND_IN = r'''#!{python}
"""Stand-in for bbcp (the real one is not installable here): copies a local file."""
import os, shutil, sys
mode = {mode!r}
args = sys.argv[1:]
src, dst = args[-2], args[-1]
if mode == "refused":
    sys.stderr.write("bbcp: Connection refused unable to connect to 127.0.0.1 port 5031\n")
    sys.stderr.write("bbcp: Unable to allocate more than 0 of 4 data streams.\n")
    sys.exit(1)
with open(os.environ["BBCP_STANDIN_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
sys.stderr.write(f"bbcp: Creating {{dst}}\n")
shutil.copyfile(src, dst)
if mode == "corrupt":
    with open(dst, "r+b") as f:
        f.seek(7)
        b = f.read(1)
        f.seek(7)
        f.write(bytes([b[0] ^ 0xFF]))
size = os.path.getsize(dst)
sys.stderr.write("bbcp: 260114 03:13:45  100% done; 98.1 MB/s\n")
sys.stderr.write(f"File {{dst}} created; {{size}} bytes at 98.1 MB/s\n")
'''


def disk(root: Path, name: str = "buffer") -> LocationRef:
    root.mkdir(parents=True, exist_ok=True)
    return LocationRef(
        id=1,
        site="ccat",
        name=name,
        location_type="buffer",
        storage_type="disk",
        root_path=str(root),
    )


def stand_in(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / f"bbcp-{mode}"
    path.write_text(STAND_IN.format(python=sys.executable, mode=mode))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("BBCP_STANDIN_LOG", str(tmp_path / "bbcp-args.log"))
    return str(path)


def test_copy_flow_verifies_and_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    data = os.urandom(2_000_000)
    (tmp_path / "a/tp.tar").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    seen: list[int] = []
    mover = BbcpMover({"bbcp_path": stand_in(tmp_path, "ok", monkeypatch), "streams": 4})
    assert mover.available()
    result = mover.copy(
        src, "tp.tar", dst, "in/tp.tar", expected_checksum=digest, progress=seen.append
    )
    assert (tmp_path / "b/in/tp.tar").read_bytes() == data
    assert result.checksum == digest and result.bytes == len(data)
    assert result.extra["bbcp"]["rate_bytes_per_s"] == pytest.approx(98.1 * MB)
    assert result.extra["verified_at"] == "destination"
    assert "File " in result.output
    assert seen[-1] == len(data)
    logged = (tmp_path / "bbcp-args.log").read_text()
    assert "-s 4" in logged and logged.strip().endswith("in/tp.tar.part-bbcp")
    assert sorted(p.name for p in (tmp_path / "b/in").iterdir()) == ["tp.tar"]
    again = mover.copy(src, "tp.tar", dst, "in/tp.tar", expected_checksum=digest)
    assert again.extra.get("skipped") is True


def test_copy_flow_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    data = os.urandom(100_000)
    (tmp_path / "a/tp.tar").write_bytes(data)
    mover = BbcpMover({"bbcp_path": stand_in(tmp_path, "corrupt", monkeypatch)})
    with pytest.raises(ChecksumMismatchError) as info:
        mover.copy(src, "tp.tar", dst, "tp.tar", expected_checksum=hashlib.sha256(data).hexdigest())
    assert info.value.retryable
    assert list((tmp_path / "b").iterdir()) == []


def test_copy_flow_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    (tmp_path / "a/tp.tar").write_bytes(b"x" * 100)
    mover = BbcpMover({"bbcp_path": stand_in(tmp_path, "refused", monkeypatch)})
    with pytest.raises(BBCPError) as info:
        mover.copy(src, "tp.tar", dst, "tp.tar")
    assert info.value.retryable and isinstance(info.value, NetworkError)
    assert "Connection refused" in str(info.value)
    assert not (tmp_path / "b/tp.tar").exists()


# -- the real thing, where installed --------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("bbcp") is None,
    reason="bbcp is not installed: it is not packaged for Debian and cannot be installed on "
    "this machine; the builder, parser and copy flow are tested above",
)
def test_real_bbcp_over_sshd(sshd: SshServer, remote_disk: LocationRef, tmp_path: Path) -> None:
    src = disk(tmp_path / "local", "source")
    data = os.urandom(8_000_000)
    (tmp_path / "local/tp.tar").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    mover = BbcpMover({**sshd.options, "streams": 2, "progress_interval": 1})
    result = mover.copy(src, "tp.tar", remote_disk, "in/tp.tar", expected_checksum=digest)
    assert result.checksum == digest
    assert (Path(str(remote_disk.root_path)) / "in/tp.tar").read_bytes() == data
