"""S3 backend of the storage seam: `s3://bucket/key` URIs through boto3.

Importing this module registers the backend (`storage_for("s3://...")` imports it lazily).

Configuration from the environment, except the endpoint of a job: the driver resolves it once
(``--s3-endpoint-url``, else the variables below) and hands it to the backend's constructor through
``bulk_explain.workers.storage.configure_storage``, in the driver and in every worker (from the worker settings;
never through Ray's runtime_env, which Ray logs, nor by writing os.environ):

``BULK_EXPLAIN_S3_ENDPOINT_URL``
    Endpoint of an S3-compatible store (MinIO, Ceph, moto), e.g. ``http://10.0.0.5:9000``.
    Wins over the two standard variables below; ``--s3-endpoint-url`` wins over it.
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
    boto3's own standard variables (botocore >= 1.31 honours them natively; checked with
    botocore 1.43). Used when the variable above is unset; ``endpoint_url`` in the AWS config file
    works too.
``BULK_EXPLAIN_S3_PAGE_SIZE``
    Keys per ListObjectsV2 request, 1..1000 (default 1000, the S3 maximum).
``BULK_EXPLAIN_S3_MAX_POOL_CONNECTIONS``
    HTTP connections the process's one shared client keeps open (default 64; the workers' read and
    write thread pools share it).
``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS``
    botocore's retry settings; the defaults here are ``standard`` and 10 attempts, so 503 SlowDown,
    500s and connection resets are retried with jittered exponential backoff.
``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``
    botocore's own switch, for older S3-compatible stores that reject the CRC32 checksums botocore
    >= 1.36 sends by default.

Credentials come from boto3's standard chain only (environment, shared config/credentials files,
SSO, container and instance-profile roles). This module never reads, logs or stores them; the pyarrow
filesystem gets the chain's current temporary values handed over in memory.

Errors: listing a missing bucket or an empty prefix raises `StorageError` (like a missing local
folder); reading a missing object raises `FileNotFoundError`, a forbidden one `PermissionError`, so
per-image error handling is the same as for local files.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import random
import threading
import time
from typing import Dict, Iterator, Optional, Tuple

from bulk_explain.workers.environment import env_number
from bulk_explain.workers.storage import (IMAGE_EXTENSIONS, FileEntry, Storage, StorageError, Versioned,
                             register_storage)

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "BULK_EXPLAIN_S3_ENDPOINT_URL"
PAGE_SIZE_ENV = "BULK_EXPLAIN_S3_PAGE_SIZE"
POOL_ENV = "BULK_EXPLAIN_S3_MAX_POOL_CONNECTIONS"
DEFAULT_PAGE_SIZE = 1000
DEFAULT_POOL = 64
DEFAULT_RETRY_MODE = "standard"
DEFAULT_MAX_ATTEMPTS = 10
# Reading a body can fail after botocore's retries are done (the reset comes mid-stream): retried here.
BODY_READ_ATTEMPTS = 5

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
# What a store that does not implement conditional PUT answers to If-None-Match.
_NO_CONDITIONAL_CODES = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


class _Unsupported(Exception):
    """The store answered "not implemented" to a conditional request."""


def split_uri(uri: str) -> Tuple[str, str]:
    """`s3://bucket/some/key` -> `("bucket", "some/key")`.

    No URL parsing: keys are raw (spaces, unicode, `#` and `?` are part of the key).

    Raises:
        StorageError: not an s3:// URI or no bucket.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != "s3":
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _error_code(exc) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    if not code:
        code = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code


def _status(exc) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_aws_endpoint(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    try:
        return env_number(name, default, lo, hi, kind=int)
    except ValueError as exc:
        raise StorageError(str(exc)) from None


class S3Storage(Storage):
    """Amazon S3 or any S3-compatible store.

    One boto3 client per process, shared by all threads (boto3 clients are thread-safe, sessions
    are not: the session is used only under a lock, to build the client). After a fork the child
    builds its own. Arguments override the environment (tests use them to point one instance at a
    proxy); None means "read the environment when the client is first needed".
    """

    scheme = "s3"

    def __init__(self, endpoint_url: Optional[str] = None, page_size: Optional[int] = None,
                 max_attempts: Optional[int] = None):
        self._endpoint_arg = endpoint_url
        self._page_size_arg = page_size
        self._max_attempts_arg = max_attempts
        self._lock = threading.Lock()
        self._client = None
        self._session = None
        self._pid = None
        # bucket -> False once the store answered "conditional PUT not implemented".
        self._conditional_ok: Dict[str, bool] = {}

    # -- pickling: never ship a client (or anything credential-bearing) to another process --------

    def __getstate__(self):
        return {"_endpoint_arg": self._endpoint_arg, "_page_size_arg": self._page_size_arg,
                "_max_attempts_arg": self._max_attempts_arg}

    def __setstate__(self, state):
        self.__init__(state["_endpoint_arg"], state["_page_size_arg"], state["_max_attempts_arg"])

    # -- configuration ------------------------------------------------------------------------------

    def configured_endpoint(self) -> Optional[str]:
        """The explicit endpoint (argument or BULK_EXPLAIN_S3_ENDPOINT_URL), or None for boto3's own."""
        endpoint = self._endpoint_arg or os.environ.get(ENDPOINT_ENV, "").strip()
        return endpoint or None

    def page_size(self) -> int:
        if self._page_size_arg is not None:
            return int(self._page_size_arg)
        return _env_int(PAGE_SIZE_ENV, DEFAULT_PAGE_SIZE, 1, 1000)

    def _new_client(self):
        import boto3
        from botocore.config import Config

        max_attempts = self._max_attempts_arg or _env_int("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS,
                                                          1, 100)
        retry_mode = os.environ.get("AWS_RETRY_MODE", "").strip() or DEFAULT_RETRY_MODE
        config = Config(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            max_pool_connections=_env_int(POOL_ENV, DEFAULT_POOL, 1, 10_000),
            connect_timeout=10,
            read_timeout=60,
        )
        session = boto3.session.Session()
        kwargs = {"config": config}
        endpoint = self.configured_endpoint()
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        client = session.client("s3", **kwargs)
        return session, client

    @property
    def client(self):
        """The process's shared boto3 S3 client (thread-safe)."""
        pid = os.getpid()
        client = self._client
        if client is not None and self._pid == pid:
            return client
        with self._lock:
            if self._client is None or self._pid != pid:
                self._session, self._client = self._new_client()
                self._pid = pid
                logger.debug("s3 client for endpoint %s, region %s", self._client.meta.endpoint_url,
                             self._client.meta.region_name)
            return self._client

    def endpoint_url(self) -> Optional[str]:
        """The non-AWS endpoint in effect (explicit, env or config file), or None for AWS itself."""
        endpoint = self.client.meta.endpoint_url
        if self.configured_endpoint():
            return self.configured_endpoint()
        return None if _is_aws_endpoint(endpoint) else endpoint

    # -- access check ------------------------------------------------------------------------------

    # The first contact with the store uses a short connect timeout and one retry: a wrong endpoint
    # or missing credentials is reported in seconds, not after the data path's 10 backed-off attempts.
    PROBE_CONNECT_TIMEOUT_S = 3
    PROBE_MAX_ATTEMPTS = 2

    def check_access(self, uri, write=False):
        """One small LIST under `uri` through a fail-fast client: credentials, endpoint, bucket and
        read permission. Write permission shows on the first write (the driver maps it)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError,
                                         EndpointConnectionError, NoCredentialsError,
                                         PartialCredentialsError)

        from bulk_explain.workers.environment import EnvironmentProblem

        bucket, key = split_uri(uri)
        endpoint = self.configured_endpoint()
        config = Config(connect_timeout=self.PROBE_CONNECT_TIMEOUT_S, read_timeout=15,
                        retries={"mode": "standard", "max_attempts": self.PROBE_MAX_ATTEMPTS})
        where = f"S3 endpoint {endpoint}" if endpoint else "S3"
        try:
            client = boto3.session.Session().client("s3", config=config,
                                                    **({"endpoint_url": endpoint} if endpoint else {}))
            client.list_objects_v2(Bucket=bucket, Prefix=self._dir_prefix(key), MaxKeys=1)
        except (NoCredentialsError, PartialCredentialsError):
            raise EnvironmentProblem(
                f"no AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE, or run where an instance profile provides them") from None
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            raise EnvironmentProblem(
                f"cannot reach {where} for {uri} ({type(exc).__name__}): check --s3-endpoint-url "
                "(or AWS_ENDPOINT_URL_S3) and the network") from None
        except ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket":
                raise StorageError(f"S3 bucket does not exist: s3://{bucket}") from None
            if code in _DENIED_CODES:
                raise EnvironmentProblem(
                    f"access denied to {uri} ({code}): check the credentials (AWS_PROFILE, "
                    "AWS_ACCESS_KEY_ID) and the bucket's policy") from None
            raise EnvironmentProblem(f"{where} refused {uri}: {code or exc}") from None
        except BotoCoreError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EnvironmentProblem(f"cannot use {where} for {uri}: {first}") from None

    # -- listing -----------------------------------------------------------------------------------

    def _paginate(self, bucket: str, prefix: str) -> Iterator[dict]:
        """Yields raw `Contents` items page by page (memory: one page)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix,
                                   PaginationConfig={"PageSize": self.page_size()})
        try:
            for page in pages:
                yield from page.get("Contents", ())
        except self._client_error() as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket":
                raise StorageError(f"S3 bucket does not exist: s3://{bucket}") from None
            if code in _DENIED_CODES:
                raise StorageError(f"access denied listing s3://{bucket}/{prefix} ({code})") from None
            raise

    @staticmethod
    def _dir_prefix(key: str) -> str:
        key = key.strip("/")
        return key + "/" if key else ""

    def list_files(self, root, extensions=IMAGE_EXTENSIONS):
        bucket, key = split_uri(root)
        prefix = self._dir_prefix(key)
        exts = tuple(e.lower() for e in extensions) if extensions is not None else None
        seen_any = False
        for item in self._paginate(bucket, prefix):
            seen_any = True
            obj_key = item["Key"]
            rel = obj_key[len(prefix):]
            if not rel or obj_key.endswith("/"):
                continue  # "folder" marker objects
            # Hidden components (.git/, .ipynb_checkpoints/, ._foo.jpg) are never dataset images.
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if exts is not None and not rel.rsplit("/", 1)[-1].lower().endswith(exts):
                continue
            yield FileEntry(uri=f"s3://{bucket}/{obj_key}", size=int(item.get("Size", 0)),
                            version=str(item.get("ETag", "")).strip('"'))
        if not seen_any:
            raise StorageError(f"no objects under s3://{bucket}/{prefix} (empty or missing prefix)")

    def list_names(self, prefix_uri):
        bucket, key = split_uri(prefix_uri)
        prefix = self._dir_prefix(key)
        try:
            for item in self._paginate(bucket, prefix):
                if not item["Key"].endswith("/"):
                    yield f"s3://{bucket}/{item['Key']}"
        except StorageError:
            return  # like a missing local folder: nothing there

    # -- objects -----------------------------------------------------------------------------------

    @staticmethod
    def _client_error():
        from botocore.exceptions import ClientError

        return ClientError

    @staticmethod
    def _stream_errors():
        from botocore.exceptions import (ConnectionClosedError, IncompleteReadError,
                                         ReadTimeoutError, ResponseStreamingError)

        return (IncompleteReadError, ResponseStreamingError, ReadTimeoutError,
                ConnectionClosedError)

    def _raise_os_error(self, exc, uri: str):
        code = _error_code(exc)
        if code in _MISSING_CODES or code == "NoSuchBucket":
            raise FileNotFoundError(f"no such S3 object: {uri}") from None
        if code in _DENIED_CODES:
            raise PermissionError(f"access denied to {uri} ({code})") from None
        raise OSError(f"S3 error on {uri}: {code or exc}") from exc

    def read_bytes(self, uri):
        bucket, key = split_uri(uri)
        stream_errors = self._stream_errors()
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
                return response["Body"].read()
            except self._client_error() as exc:
                self._raise_os_error(exc, uri)
            except stream_errors:
                # botocore retried the request; a reset in the middle of the body lands here.
                if attempt == BODY_READ_ATTEMPTS:
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * random.random())
        raise AssertionError("unreachable")

    def read_tail(self, uri, nbytes):
        """The last `nbytes` of the object in one ranged GET (a Parquet footer; the whole object
        when it is shorter)."""
        bucket, key = split_uri(uri)
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                response = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{int(nbytes)}")
                return response["Body"].read()
            except self._client_error() as exc:
                self._raise_os_error(exc, uri)
            except self._stream_errors():
                if attempt == BODY_READ_ATTEMPTS:
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * random.random())
        raise AssertionError("unreachable")

    @staticmethod
    def _content_type(key: str) -> str:
        if key.endswith(".parquet"):
            return "application/vnd.apache.parquet"
        return mimetypes.guess_type(key)[0] or "application/octet-stream"

    def write_bytes(self, uri, data):
        """One PUT: readers see the old object or all of the new one, never a part."""
        bucket, key = split_uri(uri)
        if not key:
            raise StorageError(f"cannot write to a bucket root: {uri!r}")
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data),
                                   ContentType=self._content_type(key))
        except self._client_error() as exc:
            self._raise_os_error(exc, uri)

    @contextlib.contextmanager
    def open_write(self, uri):
        """A local temporary file, uploaded when the block ends (multipart above 8 MB: the object
        appears only when the upload completes, all of it)."""
        import tempfile

        bucket, key = split_uri(uri)
        if not key:
            raise StorageError(f"cannot write to a bucket root: {uri!r}")
        with tempfile.TemporaryFile(prefix="bulk-explain-upload-") as f:
            yield f
            f.seek(0)
            try:
                self.client.upload_fileobj(f, bucket, key, ExtraArgs={"ContentType": self._content_type(key)})
            except self._client_error() as exc:
                self._raise_os_error(exc, uri)

    def write_bytes_if_absent(self, uri: str, data: bytes) -> bool:
        """Writes `uri` only if no object is there yet (commit markers).

        Uses a conditional PUT (`If-None-Match: *`) where the store supports it, which is atomic
        against concurrent writers; on stores that answer "not implemented" it falls back to
        HEAD-then-PUT (remembered per bucket), which is not.

        Returns:
            True when this call created the object; False when one already existed. A conditional PUT
            whose success response was lost and that botocore then retried also answers False: the
            object is there either way, which is what a commit marker needs.
        """
        bucket, key = split_uri(uri)
        if not key:
            raise StorageError(f"cannot write to a bucket root: {uri!r}")
        if self._conditional_ok.get(bucket, True):
            for attempt in range(1, 6):
                try:
                    self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data),
                                           ContentType=self._content_type(key), IfNoneMatch="*")
                    self._conditional_ok[bucket] = True
                    return True
                except self._client_error() as exc:
                    code, status = _error_code(exc), _status(exc)
                    if status == 412 or code == "PreconditionFailed":
                        return False
                    if status == 409 or code == "ConditionalRequestConflict":
                        # A concurrent conditional write is in flight: AWS says retry.
                        time.sleep(0.05 * 2 ** attempt * random.random())
                        continue
                    if code in _NO_CONDITIONAL_CODES or status in (400, 501):
                        logger.info("s3://%s: conditional PUT not supported (%s); using "
                                    "HEAD-then-PUT", bucket, code or status)
                        self._conditional_ok[bucket] = False
                        break
                    self._raise_os_error(exc, uri)
            else:
                raise OSError(f"conditional PUT of {uri} kept conflicting with another writer")
        if self.exists(uri):
            return False
        self.write_bytes(uri, data)
        return True

    # -- conditional writes (the output lease) -------------------------------------------------------
    # If-None-Match: * creates, If-Match: <etag> replaces or deletes, atomically on AWS S3 (since
    # 2024) and stores that implement them. A store that answers "not implemented" gets
    # check-then-write instead (remembered per bucket, see conditional_writes_atomic): two writers
    # within one round trip of each other can then both win.

    def read_versioned(self, uri):
        import calendar
        from email.utils import parsedate_to_datetime

        bucket, key = split_uri(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
        except self._client_error() as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            self._raise_os_error(exc, uri)
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        modified = calendar.timegm(response["LastModified"].utctimetuple())
        # The store's clock: its Date header (same 1 s resolution as Last-Modified).
        date = headers.get("date")
        store_now = parsedate_to_datetime(date).timestamp() if date else float(modified)
        return Versioned(data, str(response.get("ETag", "")), float(modified), store_now)

    def _conditional_put(self, uri: str, data: bytes, **condition) -> Optional[str]:
        """One conditional PUT; the new ETag, None when the condition failed, or raises
        `_Unsupported` when the store does not implement the condition."""
        bucket, key = split_uri(uri)
        if not key:
            raise StorageError(f"cannot write to a bucket root: {uri!r}")
        for attempt in range(1, 6):
            try:
                response = self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data),
                                                  ContentType=self._content_type(key), **condition)
                return str(response.get("ETag", ""))
            except self._client_error() as exc:
                code, status = _error_code(exc), _status(exc)
                if status == 412 or code == "PreconditionFailed" or code in _MISSING_CODES:
                    return None
                if status == 409 or code == "ConditionalRequestConflict":
                    time.sleep(0.05 * 2 ** attempt * random.random())
                    continue
                if code in _NO_CONDITIONAL_CODES or status in (400, 501):
                    logger.info("s3://%s: conditional PUT not supported (%s); using check-then-write",
                                bucket, code or status)
                    self._conditional_ok[bucket] = False
                    raise _Unsupported() from None
                self._raise_os_error(exc, uri)
        raise OSError(f"conditional PUT of {uri} kept conflicting with another writer")

    def _plain_put(self, uri: str, data: bytes) -> str:
        bucket, key = split_uri(uri)
        try:
            response = self.client.put_object(Bucket=bucket, Key=key, Body=bytes(data),
                                              ContentType=self._content_type(key))
        except self._client_error() as exc:
            self._raise_os_error(exc, uri)
        return str(response.get("ETag", ""))

    def _current_etag(self, uri: str) -> Optional[str]:
        bucket, key = split_uri(uri)
        try:
            return str(self.client.head_object(Bucket=bucket, Key=key).get("ETag", ""))
        except self._client_error() as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            self._raise_os_error(exc, uri)

    def create_versioned(self, uri, data):
        bucket, _ = split_uri(uri)
        if self._conditional_ok.get(bucket, True):
            try:
                return self._conditional_put(uri, data, IfNoneMatch="*")
            except _Unsupported:
                pass
        if self._current_etag(uri) is not None:
            return None
        return self._plain_put(uri, data)

    def replace_versioned(self, uri, data, expected_version):
        bucket, _ = split_uri(uri)
        if self._conditional_ok.get(bucket, True):
            try:
                return self._conditional_put(uri, data, IfMatch=expected_version)
            except _Unsupported:
                pass
        if self._current_etag(uri) != expected_version:
            return None
        return self._plain_put(uri, data)

    def delete_versioned(self, uri, expected_version):
        bucket, key = split_uri(uri)
        if self._conditional_ok.get(bucket, True):
            try:
                self.client.delete_object(Bucket=bucket, Key=key, IfMatch=expected_version)
                return True
            except self._client_error() as exc:
                code, status = _error_code(exc), _status(exc)
                if status == 412 or code == "PreconditionFailed" or code in _MISSING_CODES:
                    return False
                if not (code in _NO_CONDITIONAL_CODES or status in (400, 501)):
                    self._raise_os_error(exc, uri)
                # conditional deletes are newer than conditional PUTs: fall through for this call
        if self._current_etag(uri) != expected_version:
            return False
        self.delete(uri)
        return True

    def conditional_writes_atomic(self, uri):
        return self._conditional_ok.get(split_uri(uri)[0], True)

    def exists(self, uri):
        """True for an object, or for a "folder" (a prefix with at least one object under it)."""
        bucket, key = split_uri(uri)
        if key and not key.endswith("/"):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except self._client_error() as exc:
                code = _error_code(exc)
                if code == "NoSuchBucket":
                    return False
                if code not in _MISSING_CODES:
                    self._raise_os_error(exc, uri)
        try:
            response = self.client.list_objects_v2(Bucket=bucket, Prefix=self._dir_prefix(key),
                                                   MaxKeys=1)
        except self._client_error() as exc:
            if _error_code(exc) == "NoSuchBucket":
                return False
            self._raise_os_error(exc, uri)
        return bool(response.get("KeyCount") or response.get("Contents"))

    def stat(self, uri):
        """One HEAD: size and ETag (the version `list_files` reports)."""
        bucket, key = split_uri(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except self._client_error() as exc:
            self._raise_os_error(exc, uri)
        return FileEntry(uri=uri, size=int(head.get("ContentLength", 0)),
                         version=str(head.get("ETag", "")).strip('"'))

    def delete(self, uri):
        bucket, key = split_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except self._client_error() as exc:
            if _error_code(exc) not in _MISSING_CODES | {"NoSuchBucket"}:
                self._raise_os_error(exc, uri)

    # -- names -------------------------------------------------------------------------------------

    def join(self, base, *parts):
        bucket, key = split_uri(base)
        pieces = [p.strip("/") for p in (key, *parts) if p and p.strip("/")]
        return f"s3://{bucket}/" + "/".join(pieces) if pieces else f"s3://{bucket}"

    def normalize(self, uri: str) -> str:
        bucket, key = split_uri(uri)
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"

    # -- pyarrow -----------------------------------------------------------------------------------

    def filesystem(self, root):
        """`(pyarrow.fs.S3FileSystem, "bucket/key")` on the same endpoint, region and credentials.

        `pyarrow.dataset.dataset(path, filesystem=fs)` then reads Parquet under `root`.
        """
        import pyarrow.fs

        bucket, key = split_uri(root)
        client = self.client
        kwargs = {
            "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(
                max_attempts=self._max_attempts_arg or DEFAULT_MAX_ATTEMPTS),
        }
        endpoint = self.endpoint_url()
        region = client.meta.region_name
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kwargs["scheme"] = scheme or "https"
            kwargs["endpoint_override"] = rest.rstrip("/") if rest else endpoint
        else:
            try:
                region = pyarrow.fs.resolve_s3_region(bucket)
            except (OSError, ValueError):
                pass  # no network to AWS or no such bucket: keep the configured region
        if region:
            kwargs["region"] = region
        with self._lock:
            credentials = self._session.get_credentials() if self._session else None
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
        ca_bundle = os.environ.get("AWS_CA_BUNDLE")
        if ca_bundle and kwargs.get("scheme", "https") == "https":
            kwargs["tls_ca_file_path"] = ca_bundle
        fs = pyarrow.fs.S3FileSystem(**kwargs)
        return fs, f"{bucket}/{key.strip('/')}" if key.strip("/") else bucket

    def __repr__(self):
        return f"S3Storage(endpoint={self.configured_endpoint() or 'boto3 default'})"


register_storage("s3", S3Storage)
