"""S3 (and S3-compatible: Coscine, MinIO, Ceph RGW) with boto3: upload, download, verify.

Upload (disk -> S3), one read of the file, no extra pass:

* small files (below ``multipart_threshold``) are read once into memory and hashed; the
  checksum is compared *before* ``put_object``, so a mismatch writes nothing;
* larger files go up with the low-level multipart calls (``create_multipart_upload``,
  ``upload_part``, ``complete_multipart_upload``): each part is read once, hashed and sent.
  The expected checksum goes into the object metadata at creation; the whole-file checksum is
  compared before ``complete``, and a mismatch aborts the upload (nothing becomes visible).
  Without an expected checksum the computed one is written into the metadata after
  completion by a server-side copy (no bytes travel through the worker);
* after completion a HEAD compares size and metadata; a mismatch deletes the object and raises.

The checksum lives in the object's user metadata as ``x-amz-meta-ccat-checksum:
<algorithm>:<hex>`` next to any metadata the caller passes.

Download (S3 -> disk) streams ``get_object`` into ``<destination>.part-<random>``, hashing as
it writes, compares with the expected checksum (or the one in the object's metadata), fsyncs
and renames. S3 -> S3 copies are not supported.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..checksums import CHUNK, hash_bytes, hash_file, new_hasher
from ..errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    NetworkError,
    StorageError,
)
from ..locations import LocationRef
from .base import CopyResult, Progress
from .local import (
    ProgressTicker,
    check_existing_local,
    local_path,
    normalize_checksum,
    storage_error,
    write_verified,
)

#: User-metadata key holding ``"<algorithm>:<hex>"`` (sent as ``x-amz-meta-ccat-checksum``).
CHECKSUM_KEY = "ccat-checksum"

MiB = 1 << 20
#: S3's smallest part (all but the last) and largest part count.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Largest object ``copy_object`` can copy in one request.
COPY_OBJECT_LIMIT = 5 * 1024 * MiB

_ACCESS_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AccountProblem",
    "403",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "503",
}


class S3Mover:
    """Verified copies between a local disk and S3 (both directions).

    Options: ``part_size`` (bytes, default 64 MiB, at least 5 MiB), ``multipart_threshold``
    (bytes, default = part_size), ``overwrite`` (bool), ``max_attempts`` (botocore retries,
    default 5), ``connect_timeout`` / ``read_timeout`` (s, default 10 / 120),
    ``addressing_style`` (``path`` when an endpoint_url is set, else ``auto``),
    ``storage_class`` (e.g. ``STANDARD_IA``), ``max_pool_connections`` (default 10).
    """

    name = "s3"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.part_size = int(opts.get("part_size", 64 * MiB))
        if self.part_size < MIN_PART_SIZE:
            raise ConfigurationError(
                f"s3 part_size {self.part_size} is below S3's minimum of {MIN_PART_SIZE} bytes"
            )
        self.multipart_threshold = int(opts.get("multipart_threshold", self.part_size))
        self.overwrite = bool(opts.get("overwrite", False))
        self.max_attempts = int(opts.get("max_attempts", 5))
        self.connect_timeout = float(opts.get("connect_timeout", 10))
        self.read_timeout = float(opts.get("read_timeout", 120))
        self.addressing_style = opts.get("addressing_style")
        self.storage_class = opts.get("storage_class")
        self.max_pool_connections = int(opts.get("max_pool_connections", 10))
        self.copy_object_limit = int(opts.get("copy_object_limit", COPY_OBJECT_LIMIT))
        self._clients: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    # -- client ---------------------------------------------------------------------------------

    def client(self, loc: LocationRef) -> Any:
        """The boto3 S3 client for ``loc`` (cached per endpoint, region and credentials)."""
        if loc.storage_type != "s3" or not loc.bucket:
            raise ConfigurationError(f"location {loc.label} is not an S3 location with a bucket")
        key = (loc.endpoint_url, loc.region, loc.credentials)
        with self._lock:
            cached = self._clients.get(key)
            if cached is not None:
                return cached
            import boto3
            from botocore.config import Config

            style = self.addressing_style or ("path" if loc.endpoint_url else "auto")
            config = Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                max_pool_connections=self.max_pool_connections,
                s3={"addressing_style": style},
            )
            kwargs: dict[str, Any] = {
                "endpoint_url": loc.endpoint_url or None,
                "region_name": loc.region or "us-east-1",
                "config": config,
            }
            if loc.credentials:
                kwargs["aws_access_key_id"] = loc.credentials[0]
                kwargs["aws_secret_access_key"] = loc.credentials[1]
            client = boto3.session.Session().client("s3", **kwargs)
            self._clients[key] = client
            return client

    # -- copy -----------------------------------------------------------------------------------

    def copy(
        self,
        src: LocationRef,
        src_path: str,
        dst: LocationRef,
        dst_path: str,
        *,
        algorithm: str = "sha256",
        expected_checksum: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> CopyResult:
        """Upload (disk -> S3) or download (S3 -> disk) one file, verified.

        See :meth:`data_transfer.movers.base.Mover.copy`. ``metadata`` is stored as S3 user
        metadata on upload (keys lower-cased), beside ``ccat-checksum``.
        """
        new_hasher(algorithm)
        expected = normalize_checksum(expected_checksum, algorithm)
        if src.storage_type == "s3" and dst.storage_type == "s3":
            raise ConfigurationError(
                f"S3 -> S3 copies are not supported ({src.label} -> {dst.label}): stage the "
                "object to a disk location and upload it from there"
            )
        if dst.storage_type == "s3":
            source = local_path(src, src_path, "s3 (upload)")
            return self._upload(
                source,
                f"{src.label}:{src_path}",
                dst,
                dst_path,
                algorithm,
                expected,
                metadata or {},
                progress,
            )
        if src.storage_type == "s3":
            target = local_path(dst, dst_path, "s3 (download)")
            return self._download(
                src, src_path, dst, target, dst_path, algorithm, expected, progress
            )
        raise ConfigurationError(
            f"the s3 mover needs S3 at one end ({src.label} -> {dst.label} are both "
            f"{src.storage_type}/{dst.storage_type})"
        )

    # -- upload ---------------------------------------------------------------------------------

    def _upload(
        self,
        source: Path,
        where: str,
        dst: LocationRef,
        dst_path: str,
        algorithm: str,
        expected: str | None,
        metadata: Mapping[str, str],
        progress: Progress | None,
    ) -> CopyResult:
        start = time.monotonic()
        bucket = str(dst.bucket)
        key = dst.key(dst_path)
        label = f"s3://{bucket}/{key} ({dst.label})"
        client = self.client(dst)
        try:
            size = source.stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{where}: no such file", retryable=False) from None
        except OSError as exc:
            raise storage_error(exc, f"stat {where}") from exc
        if source.is_dir():
            raise StorageError(f"{where} is a directory; movers copy single files", retryable=False)

        with self._errors(dst, f"upload {where} -> {label}"):
            head = self._head(client, bucket, key)
            if head is not None:
                done = self._existing_object(
                    head,
                    client,
                    bucket,
                    key,
                    label,
                    size,
                    algorithm,
                    expected,
                    lambda: hash_file(source, algorithm)[0],
                )
                if done is not None:
                    return CopyResult(
                        bytes=size,
                        checksum=done,
                        algorithm=algorithm,
                        seconds=time.monotonic() - start,
                        output=f"{label} already holds identical content",
                        extra={"skipped": True, "bucket": bucket, "key": key},
                    )

            user_meta = {str(k).lower(): str(v) for k, v in metadata.items()}
            user_meta.pop(CHECKSUM_KEY, None)
            ticker = ProgressTicker(progress)
            if size < self.multipart_threshold:
                digest, nbytes, parts = self._put_single(
                    client, source, where, bucket, key, size, algorithm, expected, user_meta, ticker
                )
            else:
                digest, nbytes, parts = self._put_multipart(
                    client, source, where, bucket, key, size, algorithm, expected, user_meta, ticker
                )
            ticker(nbytes, final=True)
            head = self._head(client, bucket, key)
            self._verify_head(client, head, bucket, key, label, nbytes, algorithm, digest)
        return CopyResult(
            bytes=nbytes,
            checksum=digest,
            algorithm=algorithm,
            seconds=time.monotonic() - start,
            output=f"uploaded {where} to {label}: {nbytes} bytes in {parts} part(s)",
            extra={"bucket": bucket, "key": key, "parts": parts, "etag": (head or {}).get("ETag")},
        )

    def _put_single(
        self,
        client: Any,
        source: Path,
        where: str,
        bucket: str,
        key: str,
        size: int,
        algorithm: str,
        expected: str | None,
        user_meta: dict[str, str],
        ticker: ProgressTicker,
    ) -> tuple[str, int, int]:
        try:
            with open(source, "rb", buffering=0) as f:
                data = _read_full(f, size + 1)
        except OSError as exc:
            raise storage_error(exc, f"reading {where}") from exc
        if len(data) != size:
            raise StorageError(f"{where}: read {len(data)} bytes, expected {size} (file changed)")
        digest = hash_bytes(data, algorithm)
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(where, expected, digest, algorithm)
        meta = {**user_meta, CHECKSUM_KEY: f"{algorithm}:{digest}"}
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data, "Metadata": meta}
        if self.storage_class:
            kwargs["StorageClass"] = self.storage_class
        client.put_object(**kwargs)
        ticker(len(data))
        return digest, len(data), 1

    def _put_multipart(
        self,
        client: Any,
        source: Path,
        where: str,
        bucket: str,
        key: str,
        size: int,
        algorithm: str,
        expected: str | None,
        user_meta: dict[str, str],
        ticker: ProgressTicker,
    ) -> tuple[str, int, int]:
        part_size = self.part_size
        if math.ceil(size / part_size) > MAX_PARTS:  # keep within S3's 10,000 parts
            part_size = math.ceil(size / MAX_PARTS / MiB) * MiB
        meta = dict(user_meta)
        if expected is not None:
            meta[CHECKSUM_KEY] = f"{algorithm}:{expected}"
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Metadata": meta}
        if self.storage_class:
            kwargs["StorageClass"] = self.storage_class
        upload_id = client.create_multipart_upload(**kwargs)["UploadId"]
        completed = False
        try:
            h = new_hasher(algorithm)
            parts: list[dict[str, Any]] = []
            nbytes = 0
            try:
                f = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
            except OSError as exc:
                raise storage_error(exc, f"opening {where}") from exc
            with f:
                number = 1
                while True:
                    try:
                        data = _read_full(f, part_size)
                    except OSError as exc:
                        raise storage_error(exc, f"reading {where}") from exc
                    if not data and number > 1:
                        break
                    h.update(data)
                    resp = client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                    )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                    nbytes += len(data)
                    ticker(nbytes)
                    number += 1
                    if len(data) < part_size:
                        break
            digest = h.hexdigest()
            if nbytes != size:
                raise StorageError(f"{where}: read {nbytes} bytes, expected {size} (file changed)")
            if expected is not None and digest != expected:
                raise ChecksumMismatchError(where, expected, digest, algorithm)
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            completed = True
        finally:
            if not completed:
                with contextlib.suppress(Exception):
                    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if expected is None:
            try:
                self._replace_metadata(
                    client,
                    bucket,
                    key,
                    nbytes,
                    {**user_meta, CHECKSUM_KEY: f"{algorithm}:{digest}"},
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    client.delete_object(Bucket=bucket, Key=key)
                raise
        return digest, nbytes, len(parts)

    def _replace_metadata(
        self, client: Any, bucket: str, key: str, size: int, meta: dict[str, str]
    ) -> None:
        """Rewrite an object's metadata with a server-side copy onto itself."""
        source = {"Bucket": bucket, "Key": key}
        extra: dict[str, Any] = {}
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        if size <= self.copy_object_limit:
            client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource=source,
                Metadata=meta,
                MetadataDirective="REPLACE",
                **extra,
            )
            return
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta, **extra)[
            "UploadId"
        ]
        try:
            parts = []
            step = max(self.part_size, math.ceil(size / MAX_PARTS))
            for number, offset in enumerate(range(0, size, step), start=1):
                last = min(offset + step, size) - 1
                resp = client.upload_part_copy(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={offset}-{last}",
                )
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def _verify_head(
        self,
        client: Any,
        head: dict[str, Any] | None,
        bucket: str,
        key: str,
        label: str,
        nbytes: int,
        algorithm: str,
        digest: str,
    ) -> None:
        """Compare size and stored checksum after an upload; delete the object on a mismatch."""
        if head is None:
            raise StorageError(f"{label}: object missing right after the upload completed")
        stored = (head.get("Metadata") or {}).get(CHECKSUM_KEY, "")
        size = int(head.get("ContentLength", -1))
        if size == nbytes and stored == f"{algorithm}:{digest}":
            return
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=key)
        if size != nbytes:
            raise StorageError(f"{label}: stored {size} bytes, uploaded {nbytes}; object deleted")
        actual = stored.partition(":")[2] or "(none)"
        raise ChecksumMismatchError(label, digest, actual, algorithm)

    def _existing_object(
        self,
        head: dict[str, Any],
        client: Any,
        bucket: str,
        key: str,
        label: str,
        size: int,
        algorithm: str,
        expected: str | None,
        source_digest: Callable[[], str],
    ) -> str | None:
        """Checksum if the existing object is identical, None to overwrite, else raise."""
        if self.overwrite:
            # a repair: the stored checksum metadata survives bit rot in the object's bytes,
            # so it proves nothing here; write the good bytes again (verified on upload)
            return None
        why: str
        have_size = int(head.get("ContentLength", -1))
        if have_size != size:
            why = f"{have_size} bytes, source has {size}"
        else:
            algo, _, stored = (head.get("Metadata") or {}).get(CHECKSUM_KEY, "").partition(":")
            have = (
                stored
                if algo == algorithm and stored
                else self._hash_object(client, bucket, key, algorithm)[0]
            )
            want = expected if expected is not None else source_digest()
            if have == want:
                return have
            why = f"{algorithm} {have}, source has {want}"
        if self.overwrite:
            return None
        raise DestinationExistsError(f"{label} already exists with different content ({why})")

    # -- download -------------------------------------------------------------------------------

    def _download(
        self,
        src: LocationRef,
        src_path: str,
        dst: LocationRef,
        target: Path,
        dst_path: str,
        algorithm: str,
        expected: str | None,
        progress: Progress | None,
    ) -> CopyResult:
        start = time.monotonic()
        bucket = str(src.bucket)
        key = src.key(src_path)
        label = f"s3://{bucket}/{key} ({src.label})"
        client = self.client(src)
        with self._errors(src, f"download {label}"):
            head = self._head(client, bucket, key)
            if head is None:
                raise StorageError(f"{label}: no such object", retryable=False)
            size = int(head["ContentLength"])
            algo, _, stored = (head.get("Metadata") or {}).get(CHECKSUM_KEY, "").partition(":")
            stored_sum = stored.lower() if algo == algorithm and stored else None
            want = expected if expected is not None else stored_sum
            existing = check_existing_local(
                None,
                size,
                target,
                f"{dst.label}:{dst_path}",
                algorithm,
                want,
                overwrite=self.overwrite,
                source_digest=lambda: self._hash_object(client, bucket, key, algorithm)[0],
            )
            if existing is not None:
                return CopyResult(
                    bytes=size,
                    checksum=existing,
                    algorithm=algorithm,
                    seconds=time.monotonic() - start,
                    output=f"{dst.label}:{dst_path} already holds identical content",
                    extra={"skipped": True, "bucket": bucket, "key": key},
                )
            resp = client.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])
            body = resp["Body"]
            try:
                digest, nbytes = write_verified(
                    target,
                    body,
                    algorithm=algorithm,
                    expected=want,
                    where=label,
                    dst_label=dst.label,
                    progress=progress,
                    chunk_size=CHUNK,
                    expected_size=size,
                )
            finally:
                body.close()
        return CopyResult(
            bytes=nbytes,
            checksum=digest,
            algorithm=algorithm,
            seconds=time.monotonic() - start,
            output=f"downloaded {label} to {dst.label}:{dst_path}: {nbytes} bytes",
            extra={
                "bucket": bucket,
                "key": key,
                "etag": head.get("ETag"),
                "verified_against": "expected"
                if expected is not None
                else "object metadata"
                if stored_sum
                else "nothing (no checksum known)",
            },
        )

    # -- management -----------------------------------------------------------------------------

    def checksum(self, loc: LocationRef, path: str, *, algorithm: str = "sha256") -> str:
        """Read the object back (streamed) and return its checksum."""
        client = self.client(loc)
        key = loc.key(path)
        with self._errors(loc, f"checksum of s3://{loc.bucket}/{key}"):
            return self._hash_object(client, str(loc.bucket), key, algorithm)[0]

    def stored_checksum(self, loc: LocationRef, path: str) -> str | None:
        """The ``"<algorithm>:<hex>"`` recorded in the object's metadata (None if absent)."""
        client = self.client(loc)
        key = loc.key(path)
        with self._errors(loc, f"HEAD s3://{loc.bucket}/{key}"):
            head = self._head(client, str(loc.bucket), key)
        if head is None:
            return None
        return (head.get("Metadata") or {}).get(CHECKSUM_KEY)

    def size(self, loc: LocationRef, path: str) -> int | None:
        """Object size from a HEAD request, None when it does not exist."""
        client = self.client(loc)
        key = loc.key(path)
        with self._errors(loc, f"HEAD s3://{loc.bucket}/{key}"):
            head = self._head(client, str(loc.bucket), key)
        return None if head is None else int(head["ContentLength"])

    def delete(self, loc: LocationRef, path: str) -> bool:
        """Delete the object; False when it did not exist."""
        client = self.client(loc)
        key = loc.key(path)
        with self._errors(loc, f"delete s3://{loc.bucket}/{key}"):
            if self._head(client, str(loc.bucket), key) is None:
                return False
            client.delete_object(Bucket=loc.bucket, Key=key)
        return True

    def free_space(self, loc: LocationRef) -> int | None:
        """S3 has no notion of free space: None."""
        return None

    # -- internals ------------------------------------------------------------------------------

    def _head(self, client: Any, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return dict(client.head_object(Bucket=bucket, Key=key))
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _hash_object(self, client: Any, bucket: str, key: str, algorithm: str) -> tuple[str, int]:
        h = new_hasher(algorithm)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        n = 0
        try:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                h.update(chunk)
                n += len(chunk)
        finally:
            body.close()
        return h.hexdigest(), n

    @contextlib.contextmanager
    def _errors(self, loc: LocationRef, what: str) -> Iterator[None]:
        """Map botocore/urllib3 failures to the transfer system's exceptions."""
        from botocore import exceptions as bx

        where = f"bucket {loc.bucket!r}" + (f" at {loc.endpoint_url}" if loc.endpoint_url else "")
        try:
            yield
        except bx.ClientError as exc:
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{what}: {where} does not exist (NoSuchBucket)", retryable=False
                ) from exc
            if code in _ACCESS_CODES:
                raise StorageError(
                    f"{what}: access to {where} denied ({code}: {message}); check the "
                    "location's credentials and the bucket policy",
                    retryable=False,
                ) from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"{what}: no such object ({code})", retryable=False) from exc
            if code in _TRANSIENT_CODES:
                raise StorageError(f"{what}: {where} is unavailable ({code}: {message})") from exc
            raise StorageError(f"{what}: {code}: {message} ({where})") from exc
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as exc:
            raise ConfigurationError(f"{what}: no S3 credentials for {loc.label}: {exc}") from exc
        except (bx.ConnectionError, bx.HTTPClientError) as exc:
            raise NetworkError(f"{what}: cannot reach {where}: {exc}") from exc
        except bx.BotoCoreError as exc:
            raise StorageError(f"{what}: {exc}") from exc
        except Exception as exc:
            import urllib3.exceptions

            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise NetworkError(f"{what}: connection to {where} broke: {exc}") from exc
            raise


def _code(exc: Any) -> str:
    err = getattr(exc, "response", {}).get("Error", {})
    code = str(err.get("Code", ""))
    if not code:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _read_full(f: Any, n: int) -> bytes:
    """Read up to ``n`` bytes (fewer only at end of file), looping over short reads."""
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        data = f.read(remaining)
        if not data:
            break
        chunks.append(data)
        remaining -= len(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
