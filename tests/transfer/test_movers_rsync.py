"""The rsync mover: local-to-local without ssh, and over a real sshd on 127.0.0.1 (``sshd``).

Needs the rsync program (Debian: ``apt-get install rsync``) and, for the ssh half, sshd
(``apt-get install openssh-server``); both fail loudly when missing instead of skipping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import xxhash

from data_transfer.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    NetworkError,
    StorageError,
)
from data_transfer.locations import LocationRef
from data_transfer.movers import RsyncMover
from data_transfer.movers.rsync import PART_SUFFIX, SshConfig, classify_failure
from tests.transfer.servers import SshServer, free_port


@pytest.fixture(autouse=True)
def _need_rsync() -> None:
    if shutil.which("rsync") is None:
        pytest.fail("the rsync mover tests need rsync: install it (apt-get install rsync)")


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


def put(root: Path, rel: str, data: bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def temporaries(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".part" in p.name or "partial" in p.name
    )


# -- local to local (no ssh) ----------------------------------------------------------------------


def test_local_copy_verifies_and_renames(tmp_path: Path) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    data = os.urandom(2_500_000)
    put(tmp_path / "a", "raw/f.tar", data)
    digest = hashlib.sha256(data).hexdigest()
    seen: list[int] = []
    result = RsyncMover().copy(
        src, "raw/f.tar", dst, "x/y/f.tar", expected_checksum=digest, progress=seen.append
    )
    assert (tmp_path / "b/x/y/f.tar").read_bytes() == data
    assert result.checksum == digest
    assert result.bytes == len(data)
    assert result.extra["verified_at"] == "destination"
    assert "rsync" in result.output and "--partial-dir=.rsync-partial" in result.output
    assert seen[-1] == len(data)
    assert temporaries(tmp_path / "b") == []


def test_local_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    put(tmp_path / "a", "f.tar", b"payload" * 1000)
    with pytest.raises(ChecksumMismatchError) as info:
        RsyncMover().copy(src, "f.tar", dst, "f.tar", expected_checksum="0" * 64)
    assert info.value.actual == hashlib.sha256(b"payload" * 1000).hexdigest()
    assert not (tmp_path / "b/f.tar").exists()
    assert temporaries(tmp_path / "b") == []


def test_local_existing_identical_and_conflict(tmp_path: Path) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    data = os.urandom(300_000)
    put(tmp_path / "a", "f", data)
    mover = RsyncMover()
    mover.copy(src, "f", dst, "f")
    again = mover.copy(src, "f", dst, "f")
    assert again.extra.get("skipped") is True
    assert again.checksum == hashlib.sha256(data).hexdigest()
    put(tmp_path / "b", "g", data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DestinationExistsError):
        mover.copy(src, "f", dst, "g")
    with pytest.raises(DestinationExistsError):
        mover.copy(src, "f", dst, "g", expected_checksum=hashlib.sha256(data).hexdigest())
    RsyncMover({"overwrite": True}).copy(src, "f", dst, "g")
    assert (tmp_path / "b/g").read_bytes() == data


def test_local_resumes_from_partial_dir(tmp_path: Path) -> None:
    """A copy interrupted earlier left its bytes in .rsync-partial; the retry completes it."""
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    data = os.urandom(1_000_000)
    put(tmp_path / "a", "f.tar", data)
    put(tmp_path / "b", f".rsync-partial/f.tar{PART_SUFFIX}", data[:400_000])
    result = RsyncMover().copy(
        src, "f.tar", dst, "f.tar", expected_checksum=hashlib.sha256(data).hexdigest()
    )
    assert result.bytes == len(data)
    assert (tmp_path / "b/f.tar").read_bytes() == data
    assert temporaries(tmp_path / "b") == []


def test_local_errors(tmp_path: Path) -> None:
    src, dst = disk(tmp_path / "a", "source"), disk(tmp_path / "b")
    with pytest.raises(StorageError) as info:
        RsyncMover().copy(src, "missing.tar", dst, "missing.tar")
    assert not info.value.retryable
    assert "missing.tar" in str(info.value)
    with pytest.raises(ConfigurationError):
        RsyncMover({"partial_dir": "../x"})
    with pytest.raises(ConfigurationError):
        RsyncMover({"strict_host_key_checking": "maybe"})
    put(tmp_path / "a", "f", b"x")
    with pytest.raises(ConfigurationError, match="cannot run"):
        RsyncMover({"rsync_path": "/nonexistent/rsync"}).copy(src, "f", dst, "f")


def test_classify_failure_samples() -> None:
    refused = (
        "ssh: connect to host 10.1.2.3 port 22: Connection refused\n"
        "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
        "rsync error: unexplained error (code 255) at io.c(232) [sender=3.2.7]"
    )
    err = classify_failure("rsync", 255, refused, "ccat/buffer:x -> cologne/buffer:x")
    assert isinstance(err, NetworkError) and err.retryable
    assert "Connection refused" in str(err)
    timeout = "rsync error: timeout in data send/receive (code 30) at io.c(197) [sender=3.2.7]"
    assert isinstance(
        classify_failure("rsync", 30, timeout, "x", network_codes=(30,)), NetworkError
    )
    auth = (
        "root@h: Permission denied (publickey,password).\r\nrsync: connection unexpectedly closed"
    )
    err = classify_failure("rsync", 255, auth, "x", network_codes=(255,))
    assert type(err) is StorageError and not err.retryable
    assert "identity_file" in str(err)
    missing = (
        'rsync: [sender] link_stat "/data/x.tar" failed: No such file or directory (2)\n'
        "rsync error: some files/attrs were not transferred (see previous errors) (code 23)"
    )
    err = classify_failure("rsync", 23, missing, "x", network_codes=(255,))
    assert type(err) is StorageError and not err.retryable
    full = 'rsync: [receiver] write failed on "/data/x": No space left on device (28)'
    err = classify_failure("rsync", 11, full, "x")
    assert type(err) is StorageError and err.retryable


def test_ssh_command_line() -> None:
    cfg = SshConfig.from_options(
        {
            "identity_file": "/etc/ccat/id_ed25519",
            "known_hosts_file": "/etc/ccat/known_hosts",
            "strict_host_key_checking": "accept-new",
            "ssh_options": ["Compression=no"],
        }
    )
    loc = LocationRef(
        id=1,
        site="cologne",
        name="buffer",
        location_type="buffer",
        storage_type="disk",
        root_path="/data",
        host="buffer.cologne",
        ssh_user="ccat",
        ssh_port=2222,
    )
    argv = cfg.argv(loc, "true")
    joined = " ".join(argv)
    assert argv[0] == "ssh"
    assert "-p 2222" in joined and "-l ccat" in joined
    assert "BatchMode=yes" in joined and "StrictHostKeyChecking=accept-new" in joined
    assert "-i /etc/ccat/id_ed25519" in joined
    assert "UserKnownHostsFile=/etc/ccat/known_hosts" in joined
    assert "Compression=no" in joined
    assert argv[-2:] == ["buffer.cologne", "true"]
    cmd = RsyncMover({"identity_file": "/k", "bwlimit": "50m"}).build_command(
        disk_like("/src"), "/src/a.tar", loc, "/data/a.tar.part-rsync", progress=False
    )
    assert cmd[-2:] == ["/src/a.tar", "ccat@buffer.cologne:/data/a.tar.part-rsync"]
    assert "--bwlimit=50m" in cmd and "--inplace" not in cmd
    assert "-p 2222" in cmd[cmd.index("-e") + 1]


def test_ssh_connection_sharing_options(tmp_path: Path) -> None:
    """Sessions share one connection per host, user, port and ssh options; the socket folder
    must be private; ``control_persist: 0`` turns sharing off."""
    ctl = tempfile.mkdtemp(prefix="ccs-")  # short: a socket name holds 107 bytes
    try:
        base = {"identity_file": "/k1", "control_dir": ctl}
        args = SshConfig.from_options(base).base_args(22)
        joined = " ".join(args)
        assert "ControlMaster=auto" in joined and "ControlPersist=60" in joined
        path = SshConfig.from_options(base).control_path()
        assert path is not None and path.startswith(ctl + "/") and path.endswith("-%C")
        assert f"ControlPath={path}" in joined
        # another key (or known-hosts file) never borrows this connection
        other = SshConfig.from_options({**base, "identity_file": "/k2"}).control_path()
        assert other != path
        # the user's own ssh_options come first, so theirs win (ssh takes the first value)
        mine = SshConfig.from_options({**base, "ssh_options": ["ControlMaster=no"]}).base_args()
        assert mine.index("ControlMaster=no") < mine.index("ControlMaster=auto")
        off = SshConfig.from_options({**base, "control_persist": 0}).base_args()
        assert not any(a.startswith("Control") for a in off)
        with pytest.raises(ConfigurationError, match="control_persist"):
            SshConfig.from_options({"control_persist": "soon"})
        # bbcp's own ssh command carries no %C (bbcp substitutes its own % tokens)
        assert "ControlPath" not in " ".join(SshConfig.from_options(base).base_args(share=False))
    finally:
        shutil.rmtree(ctl)

    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ConfigurationError, match=f"control_dir {open_dir}: others can open it"):
        SshConfig.from_options({"control_dir": str(open_dir)}).base_args()
    with pytest.raises(ConfigurationError, match="not a directory"):
        SshConfig.from_options({"control_dir": str(put(tmp_path, "file", b""))}).base_args()
    deep = tmp_path / ("d" * 80)
    with pytest.raises(ConfigurationError, match="too long for a unix socket"):
        SshConfig.from_options({"control_dir": str(deep)}).base_args()


def test_unsafe_default_socket_folder_turns_sharing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tmp_path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"ccat-ssh-{os.getuid()}").mkdir(mode=0o777)
    (tmp_path / f"ccat-ssh-{os.getuid()}").chmod(0o777)  # e.g. made by someone else's umask
    with caplog.at_level("WARNING", logger="data_transfer.movers.ssh"):
        args = SshConfig.from_options({}).base_args()
    assert not any(a.startswith("Control") for a in args)
    assert "ssh connection sharing is off" in caplog.text and "mode 777" in caplog.text


def disk_like(root: str) -> LocationRef:
    return LocationRef(
        id=2,
        site="ccat",
        name="buffer",
        location_type="buffer",
        storage_type="disk",
        root_path=root,
    )


# -- over a real sshd ----------------------------------------------------------------------------


def test_upload_over_ssh(sshd: SshServer, remote_disk: LocationRef, tmp_path: Path) -> None:
    src = disk(tmp_path / "local", "source")
    data = os.urandom(3_000_000)
    put(tmp_path / "local", "obs/f.tar", data)
    digest = hashlib.sha256(data).hexdigest()
    seen: list[int] = []
    mover = RsyncMover(sshd.options)
    result = mover.copy(
        src,
        "obs/f.tar",
        remote_disk,
        "deep/dir/f.tar",
        expected_checksum=digest,
        progress=seen.append,
    )
    remote_root = Path(str(remote_disk.root_path))
    assert (remote_root / "deep/dir/f.tar").read_bytes() == data
    assert result.checksum == digest and result.bytes == len(data)
    assert f"{sshd.user}@127.0.0.1:" in result.output
    assert seen and seen[-1] == len(data)
    assert temporaries(remote_root) == []

    assert mover.size(remote_disk, "deep/dir/f.tar") == len(data)
    assert mover.size(remote_disk, "deep/dir/nothing") is None
    assert mover.checksum(remote_disk, "deep/dir/f.tar") == digest
    assert mover.checksum(remote_disk, "deep/dir/f.tar", algorithm="md5") == (
        hashlib.md5(data).hexdigest()
    )
    assert mover.checksum(remote_disk, "deep/dir/f.tar", algorithm="blake2b") == (
        hashlib.blake2b(data).hexdigest()
    )
    assert mover.checksum(remote_disk, "deep/dir/f.tar", algorithm="adler32") == (
        f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"
    )
    # xxh3_128 (the package tars' default) is hashed remotely by xxh128sum (package xxhash):
    # the same digest as the xxhash module computes locally
    assert mover.checksum(remote_disk, "deep/dir/f.tar", algorithm="xxh3_128") == (
        xxhash.xxh3_128(data).hexdigest()
    )
    free = mover.free_space(remote_disk)
    assert free is not None and free > 0
    assert mover.free_space(sshd.location(remote_root / "not/yet")) == pytest.approx(free, rel=0.01)

    again = mover.copy(src, "obs/f.tar", remote_disk, "deep/dir/f.tar", expected_checksum=digest)
    assert again.extra.get("skipped") is True

    assert mover.delete(remote_disk, "deep/dir/f.tar") is True
    assert mover.delete(remote_disk, "deep/dir/f.tar") is False
    assert not (remote_root / "deep/dir/f.tar").exists()
    with pytest.raises(StorageError):
        mover.checksum(remote_disk, "deep/dir/f.tar")


def test_download_over_ssh(sshd: SshServer, remote_disk: LocationRef, tmp_path: Path) -> None:
    data = os.urandom(1_200_000)
    put(Path(str(remote_disk.root_path)), "pkg/p.tar", data)
    dst = disk(tmp_path / "local", "buffer")
    result = RsyncMover(sshd.options).copy(remote_disk, "pkg/p.tar", dst, "in/p.tar")
    assert (tmp_path / "local/in/p.tar").read_bytes() == data
    assert result.checksum == hashlib.sha256(data).hexdigest()
    assert temporaries(tmp_path / "local") == []


def test_remote_mismatch_leaves_nothing(
    sshd: SshServer, remote_disk: LocationRef, tmp_path: Path
) -> None:
    src = disk(tmp_path / "local", "source")
    put(tmp_path / "local", "f.tar", b"bytes" * 10_000)
    with pytest.raises(ChecksumMismatchError):
        RsyncMover(sshd.options).copy(
            src, "f.tar", remote_disk, "f.tar", expected_checksum="1" * 64
        )
    remote_root = Path(str(remote_disk.root_path))
    assert not (remote_root / "f.tar").exists()
    assert temporaries(remote_root) == []


def test_remote_conflict_and_overwrite(
    sshd: SshServer, remote_disk: LocationRef, tmp_path: Path
) -> None:
    src = disk(tmp_path / "local", "source")
    data = os.urandom(50_000)
    put(tmp_path / "local", "f", data)
    remote_root = Path(str(remote_disk.root_path))
    put(remote_root, "f", os.urandom(50_000))
    with pytest.raises(DestinationExistsError):
        RsyncMover(sshd.options).copy(src, "f", remote_disk, "f")
    RsyncMover({**sshd.options, "overwrite": True}).copy(src, "f", remote_disk, "f")
    assert (remote_root / "f").read_bytes() == data


def test_resume_over_ssh_reuses_partial_bytes(
    sshd: SshServer, remote_disk: LocationRef, tmp_path: Path
) -> None:
    """rsync's delta transfer uses the partial file as a basis: only the rest travels."""
    src = disk(tmp_path / "local", "source")
    data = os.urandom(4_000_000)
    put(tmp_path / "local", "big.tar", data)
    remote_root = Path(str(remote_disk.root_path))
    put(remote_root, f".rsync-partial/big.tar{PART_SUFFIX}", data[:3_000_000])
    mover = RsyncMover({**sshd.options, "extra_args": ["--stats"]})
    result = mover.copy(
        src, "big.tar", remote_disk, "big.tar", expected_checksum=hashlib.sha256(data).hexdigest()
    )
    assert (remote_root / "big.tar").read_bytes() == data
    matched = [ln for ln in result.output.splitlines() if ln.startswith("Matched data:")]
    assert matched, result.output
    assert int(matched[0].split(":")[1].split()[0].replace(",", "")) >= 2_500_000
    assert temporaries(remote_root) == []


def test_network_and_auth_failures(sshd: SshServer, tmp_path: Path) -> None:
    src = disk(tmp_path / "local", "source")
    put(tmp_path / "local", "f", b"x" * 1000)
    (tmp_path / "r").mkdir()
    dead = LocationRef(
        id=7,
        site="remote",
        name="down",
        location_type="buffer",
        storage_type="disk",
        root_path=str(tmp_path / "r"),
        host="127.0.0.1",
        ssh_user=sshd.user,
        ssh_port=free_port(),
    )
    with pytest.raises(NetworkError) as info:
        RsyncMover(sshd.options).copy(src, "f", dead, "f")
    assert info.value.retryable
    assert "Connection refused" in str(info.value)
    with pytest.raises(NetworkError):
        RsyncMover(sshd.options).size(dead, "f")

    wrong_key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True
    )
    target = sshd.location(tmp_path / "r")
    with pytest.raises(StorageError) as info:
        RsyncMover({**sshd.options, "identity_file": str(wrong_key)}).copy(src, "f", target, "f")
    assert not info.value.retryable
    assert not isinstance(info.value, NetworkError)

    bad_hosts = tmp_path / "known_hosts"
    pub = Path(f"{wrong_key}.pub").read_text().split()
    bad_hosts.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    with pytest.raises(StorageError) as info:
        RsyncMover({**sshd.options, "known_hosts_file": str(bad_hosts)}).size(target, "f")
    assert not info.value.retryable
    assert "host key" in str(info.value)


def test_one_copy_opens_one_ssh_connection(
    sshd: SshServer, remote_disk: LocationRef, tmp_path: Path
) -> None:
    """A copy is four ssh sessions (prepare, rsync, checksum, commit); with sharing they ride
    on one connection (counted in the server's log), without it each opens its own."""
    src = disk(tmp_path / "local", "source")
    data = os.urandom(200_000)
    put(tmp_path / "local", "f.tar", data)
    digest = hashlib.sha256(data).hexdigest()

    def logins() -> int:
        return sshd.log_file.read_text(errors="replace").count("Accepted publickey")

    ctl = tempfile.mkdtemp(prefix="ccs-")
    try:
        opened = []
        for n, persist in enumerate((60, 0)):
            mover = RsyncMover({**sshd.options, "control_dir": ctl, "control_persist": persist})
            before = logins()
            mover.copy(src, "f.tar", remote_disk, f"shared/{n}.tar", expected_checksum=digest)
            assert mover.checksum(remote_disk, f"shared/{n}.tar") == digest
            assert mover.delete(remote_disk, f"shared/{n}.tar") is True
            opened.append(logins() - before)
        assert opened[0] == 1, f"with sharing: {opened[0]} connections for one copy"
        assert opened[1] >= 5, f"without sharing: {opened[1]} connections (one per session)"
    finally:
        for sock in Path(ctl).iterdir():  # stop the master rather than wait for ControlPersist
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                capture_output=True,
                timeout=10,
            )
        shutil.rmtree(ctl, ignore_errors=True)


def test_remote_to_remote_refused(sshd: SshServer, remote_disk: LocationRef) -> None:
    with pytest.raises(ConfigurationError, match="two remote hosts"):
        RsyncMover(sshd.options).copy(remote_disk, "a", remote_disk, "b")
