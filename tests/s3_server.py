"""A real S3 HTTP server on loopback for the tests, and a proxy that makes it misbehave like S3.

Fixtures; tests/conftest.py registers them with ``pytest_plugins = ["s3_server"]``:

``s3_server`` (session)
    Starts moto's server mode (``moto.server.ThreadedMotoServer``) on 127.0.0.1 on a port the OS
    assigns at start; yields its endpoint URL and touches no environment variable. Module-scoped
    fixtures use this one.
``s3_endpoint`` (function)
    The same URL, and for the duration of one test points everything at it:
    ``BULK_EXPLAIN_S3_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_S3`` (so the job, boto3 and
    subprocesses started by the test, Ray workers included, inherit it), fake credentials, region
    ``us-east-1``, and no shared config files (a developer's real ``~/.aws`` never takes part). The
    environment is restored after the test. Request it before any fixture that starts Ray
    in-process: Ray's worker processes inherit the environment of the moment Ray starts, and
    credentials are deliberately not forwarded through runtime_env.
``s3_client`` (session)
    A plain boto3 S3 client on that endpoint with explicit fake credentials, for arranging and
    checking objects.
``s3_bucket`` (function)
    A fresh, empty bucket; yields its name.
``s3_proxy`` (function)
    A `FaultyS3Proxy` in front of the server that answers the first attempt of every 3rd distinct
    request with a real 503 SlowDown; tune ``throttle_every`` / ``reset_every`` /
    ``truncate_every`` on it (also settable while it runs). It does not
    touch the environment: point a client at ``s3_proxy.endpoint_url`` (e.g.
    ``S3Storage(endpoint_url=...)`` or ``--s3-endpoint-url``).

Helpers: `put_objects` (many PUTs over HTTP in a thread pool), `populate_bucket` (thousands of
objects in well under a second, written straight into the in-process server's state; the listing
under test still goes over HTTP).
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Mapping, Optional, Tuple

import pytest

__all__ = [
    "FaultyS3Proxy",
    "populate_bucket",
    "put_objects",
    "s3_bucket",
    "s3_client",
    "s3_endpoint",
    "s3_proxy",
    "s3_server",
]

REGION = "us-east-1"

_SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>{hid}</HostId></Error>"
)
_NOT_IMPLEMENTED_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that "
    "is not implemented</Message><Header>If-None-Match</Header><RequestId>{rid}</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}


def _forget_cached_s3_storage():
    """The storage seam caches one backend per scheme: drop it so the next one reads the new env."""
    try:
        from bulk_explain.workers.storage import reset_storage_cache
    except ImportError:
        return
    reset_storage_cache()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(s3_server, tmp_path):
    endpoint = s3_server
    mp = pytest.MonkeyPatch()
    nowhere = str(tmp_path / "no-aws-config")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", REGION)
    mp.setenv("AWS_REGION", REGION)
    mp.setenv("AWS_CONFIG_FILE", nowhere)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probes from boto3 or pyarrow
    mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    mp.setenv("BULK_EXPLAIN_S3_ENDPOINT_URL", endpoint)
    _forget_cached_s3_storage()
    try:
        yield endpoint
    finally:
        mp.undo()
        _forget_cached_s3_storage()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_server, region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=Config(max_pool_connections=32))


@pytest.fixture
def s3_bucket(s3_endpoint, s3_client):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_proxy(s3_endpoint):
    with FaultyS3Proxy(s3_endpoint, throttle_every=3) as proxy:
        yield proxy


def put_objects(client, bucket: str, objects: Mapping[str, bytes], threads: int = 16) -> None:
    """PUTs every `key -> body` over HTTP, `threads` at a time."""

    def put(item):
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, objects.items()))


def populate_bucket(client, bucket: str, objects: Mapping[str, bytes]) -> str:
    """Creates many objects fast; returns "backend" or "http" (how they were written).

    moto's server answers ~300 PUTs/s on a 2-core machine, so thousands of fixture objects are
    written straight into the state of the in-process server (the same objects a PUT creates, with
    real ETags). One object is checked over HTTP; if moto's internals moved, it falls back to PUTs.
    """
    items = list(objects.items())
    try:
        from moto.backends import get_backend
        from moto.core import DEFAULT_ACCOUNT_ID

        backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
        for key, body in items:
            backend.put_object(bucket, key, body)
        if items:
            key, body = items[-1]
            if client.get_object(Bucket=bucket, Key=key)["Body"].read() != body:
                raise LookupError("backend write not visible over HTTP")
        return "backend"
    except Exception:  # noqa: BLE001 - any internal mismatch: do it the slow, public way
        put_objects(client, bucket, objects)
        return "http"


class FaultyS3Proxy:
    """A threaded HTTP reverse proxy on 127.0.0.1 that injects S3's failure modes.

    Distinct requests (method + path + query) are numbered 1, 2, 3, ... in order of first arrival.
    Request n fails its first attempts, in this order, with
    - a 503 SlowDown (S3's own XML error body) when ``throttle_every`` divides n,
    - a TCP reset with no response when ``reset_every`` divides n,
    - for a successful GET: the headers and only the first half of the body, then a reset, when
      ``truncate_every`` divides n;
    and the next attempt goes through. So every request meets at most three faults, and a test's
    time is bounded by the client's backoff, not by luck (a global "every 3rd request" counter
    makes long streaks on one request under concurrency, and exponential backoff then takes
    minutes). Passing requests are forwarded unchanged (Host header included, so SigV4 signatures
    stay valid). 0 turns a fault off. With ``reject_conditional_writes`` a PUT carrying
    If-None-Match gets S3's 501 NotImplemented, like a store without conditional writes.
    Counters: `requests` (attempts), `distinct`, `throttled`, `resets`, `truncated`; `log` holds
    ``(method, path_and_query, fault)`` per attempt.
    """

    def __init__(self, upstream: str, throttle_every: int = 0, reset_every: int = 0,
                 truncate_every: int = 0, reject_conditional_writes: bool = False):
        scheme, _, hostport = upstream.partition("://")
        if scheme != "http":
            raise ValueError("FaultyS3Proxy forwards to http:// upstreams only")
        host, _, port = hostport.rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.throttle_every = throttle_every
        self.reset_every = reset_every
        self.truncate_every = truncate_every
        self.reject_conditional_writes = reject_conditional_writes
        self.requests = self.distinct = self.throttled = self.resets = self.truncated = 0
        self._attempts: Dict[Tuple[str, str], int] = {}
        self._schedules: Dict[Tuple[str, str], List[str]] = {}
        self.log: List[Tuple[str, str, Optional[str]]] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "FaultyS3Proxy":
        proxy = self

        class Handler(_ProxyHandler):
            pass

        Handler.proxy = proxy
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="faulty-s3-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- decisions ---------------------------------------------------------------------------------

    def _decide(self, method: str, path: str) -> Tuple[int, Optional[str]]:
        with self._lock:
            self.requests += 1
            attempt = self._attempts.get((method, path), 0)
            self._attempts[(method, path)] = attempt + 1
            if attempt == 0:
                self.distinct += 1
                n = self.distinct
                schedule = []
                if self.throttle_every and n % self.throttle_every == 0:
                    schedule.append("throttle")
                if self.reset_every and n % self.reset_every == 0:
                    schedule.append("reset")
                if self.truncate_every and method == "GET" and n % self.truncate_every == 0:
                    schedule.append("truncate")
                self._schedules[(method, path)] = schedule
            schedule = self._schedules.get((method, path), [])
            fault = schedule[attempt] if attempt < len(schedule) else None
            if fault == "throttle":
                self.throttled += 1
            elif fault == "reset":
                self.resets += 1
            self.log.append((method, path, fault))
            return attempt, fault

    def _count_truncated(self):
        with self._lock:
            self.truncated += 1

    def upstream_connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            self._local.conn = conn
        return conn

    def requests_matching(self, method: str, query_part: str = "") -> List[str]:
        """Paths (with query) of the logged requests with `method` whose path contains `query_part`."""
        with self._lock:
            return [p for m, p, _ in self.log if m == method and query_part in p]


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like S3
    proxy: FaultyS3Proxy

    def log_message(self, format, *args):  # noqa: A002 - silence the per-request stderr line
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length", 0) or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self):
        # SO_LINGER 0: close() sends RST, what a dropped connection looks like to the client.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _error(self, status: int, reason: str, template: str):
        rid = uuid.uuid4().hex[:16].upper()
        body = template.format(rid=rid, hid=uuid.uuid4().hex).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", rid)
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _slowdown(self):
        self._error(503, "Slow Down", _SLOWDOWN_BODY)

    def _forward(self, body: bytes):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):
            conn = self.proxy.upstream_connection(fresh=attempt == 1)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp, data
            except (http.client.HTTPException, OSError):
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _handle(self):
        body = self._read_body()
        _, fault = self.proxy._decide(self.command, self.path)
        if fault == "throttle":
            return self._slowdown()
        if fault == "reset":
            return self._reset()
        if (self.proxy.reject_conditional_writes and self.command == "PUT"
                and "If-None-Match" in self.headers):
            return self._error(501, "Not Implemented", _NOT_IMPLEMENTED_BODY)
        resp, data = self._forward(body)
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() in _HOP_BY_HOP or key.lower() == "content-length":
                continue
            self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate" and resp.status == 200 and len(data) >= 2:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.proxy._count_truncated()
            return self._reset()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
