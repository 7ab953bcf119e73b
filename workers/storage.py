"""Storage seam: every byte the job reads or writes goes through a `Storage`.

A backend is one class registered for a URI scheme. The driver lists through it, workers read
images and write outputs through it; nothing else touches `open()` or boto3 directly, so a new
store (S3, GCS, ...) is one more subclass, not a branch in the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import stat
import uuid
from typing import Callable, Dict, Iterator, Optional

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Temp files of atomic local writes: "_tmp-<uuid>-<name>.tmp". The "_" prefix hides them from
# pyarrow/Spark dataset discovery and the ".tmp" suffix from "*.parquet" globs (DuckDB, Polars);
# a crash leaves them behind and the driver deletes them on the next run.
TEMP_PREFIX = "_tmp-"
TEMP_SUFFIX = ".tmp"


def is_temp_name(uri: str) -> bool:
    name = uri.rsplit("/", 1)[-1]
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One listed object.

    Attributes:
        uri: absolute path or `scheme://bucket/key`.
        size: bytes.
        version: what changes when the content changes: "SIZE:MTIME_NS" locally (a rewrite that
            keeps the mtime, as `cp -p` or `rsync -t` do, still changes the size in most cases;
            `Storage.content_version` covers the rest), the ETag on S3.
    """

    uri: str
    size: int
    version: str


class StorageError(Exception):
    """A storage operation failed in a way the user must fix (missing root, no permission...)."""


class Storage:
    """Base class: one instance per URI scheme, safe to share between threads."""

    scheme: str = ""
    # Whether a crashed write can leave a visible temp file (`is_temp_name`) behind; an object
    # store's upload is all or nothing, so the driver need not list folders looking for them.
    leaves_temp_files: bool = False

    def list_files(self, root: str, extensions=IMAGE_EXTENSIONS) -> Iterator[FileEntry]:
        """Yields every file under `root` (recursive) whose name ends in one of `extensions`.

        Order is unspecified; the planner sorts.
        """
        raise NotImplementedError

    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def read_tail(self, uri: str, nbytes: int) -> bytes:
        """The last `nbytes` bytes of `uri` (all of it when shorter): a Parquet footer without
        reading the data pages. Backends override this with a ranged read."""
        return self.read_bytes(uri)[-nbytes:]

    def content_version(self, entry: FileEntry) -> str:
        """A version derived from the bytes themselves (`--verify-content`).

        The base returns `entry.version`: backends whose listing version already is a content
        hash (S3's ETag) need nothing more. `LocalStorage` reads and hashes the file.
        """
        return entry.version

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Writes `data` so that readers see either nothing or all of it (atomic replace)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open_write(self, uri: str):
        """A binary file to write `uri` piece by piece, published as `write_bytes` publishes (readers
        see the old content or all of the new) when the block ends, discarded on an exception.

        For large files (the plan of 10M inputs is 350 MB): `LocalStorage` writes a temporary file
        beside the target and `S3Storage` a local temporary file that it uploads, so the file is
        never held in memory; this base buffers it and calls `write_bytes`.
        """
        import io

        buf = io.BytesIO()
        yield buf
        self.write_bytes(uri, buf.getvalue())

    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def stat(self, uri: str) -> FileEntry:
        """Size and version of one file, as `list_files` reports them.

        Raises:
            FileNotFoundError: no such file.
        """
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        """Deletes `uri` if it exists."""
        raise NotImplementedError

    def delete_tree(self, prefix_uri: str) -> None:
        """Deletes everything under `prefix_uri` (a folder, or every key under a prefix)."""
        for name in list(self.list_names(prefix_uri)):
            self.delete(name)

    def list_names(self, prefix_uri: str) -> Iterator[str]:
        """Yields URIs directly or recursively under `prefix_uri` (no extension filter)."""
        raise NotImplementedError

    def join(self, base: str, *parts: str) -> str:
        raise NotImplementedError

    def is_inside(self, child: str, parent: str) -> bool:
        """True when `child` is `parent` or lies under it."""
        child, parent = child.rstrip("/"), parent.rstrip("/")
        return child == parent or child.startswith(parent + "/")

    def filesystem(self, root: str):
        """Returns `(pyarrow.fs.FileSystem, path)` for reading Parquet datasets under `root`."""
        raise NotImplementedError

    def check_access(self, uri: str, write: bool = False) -> None:
        """Fails fast, before the job loads a model or starts Ray, when `uri` cannot be used from
        this machine (no credentials, endpoint unreachable, no permission to write).

        Raises:
            bulk_explain.workers.environment.EnvironmentProblem: one line naming the fix.
        """

    # -- conditional writes (the output lease, workers/lease.py) ------------------------------------
    # A "version" is an opaque token that changes whenever the object's bytes change (sha256 of the
    # content locally, the ETag on S3). Times are the STORE's clock, never the caller's: a lease's
    # expiry must not depend on which machine looks at it.

    def read_versioned(self, uri: str) -> Optional["Versioned"]:
        """Reads `uri` with its version, its modification time and the store's current time.

        Returns:
            A `Versioned`, or None when there is no object.
        """
        raise NotImplementedError

    def create_versioned(self, uri: str, data: bytes) -> Optional[str]:
        """Creates `uri` only if nothing is there (atomic against concurrent creators where
        `conditional_writes_atomic` says so).

        Returns:
            The new version, or None when an object already existed (nothing written).
        """
        raise NotImplementedError

    def replace_versioned(self, uri: str, data: bytes, expected_version: str) -> Optional[str]:
        """Replaces `uri` only if its current version is `expected_version`.

        Returns:
            The new version, or None when the object changed or vanished (nothing written).
        """
        raise NotImplementedError

    def delete_versioned(self, uri: str, expected_version: str) -> bool:
        """Deletes `uri` only if its current version is `expected_version`. Returns True if deleted."""
        raise NotImplementedError

    def conditional_writes_atomic(self, uri: str) -> bool:
        """False when the store lacks conditional writes and the methods above fall back to
        check-then-write (two writers racing within one round trip can then both succeed)."""
        return True


@dataclasses.dataclass(frozen=True)
class Versioned:
    """An object read together with what a compare-and-swap needs.

    Attributes:
        data: the bytes.
        version: opaque token that changes with the content (sha256 locally, ETag on S3).
        modified: the object's last write, seconds since the epoch on the store's clock.
        store_now: the store's time at the read, same clock (S3 `Date` header; locally the mtime
            of a file created for the purpose, i.e. the clock that stamps the files).
    """

    data: bytes
    version: str
    modified: float
    store_now: float


# Local names that are not valid UTF-8 keep their bytes >= 0x80 as "\xNN" escapes (Arrow strings
# must be UTF-8). To keep the mapping one-to-one, a literal backslash that would read as such an
# escape ("\x" + two lowercase hex digits) is itself escaped as "\x5c": a file named with the raw
# byte 0xE9 is "\xe9", one literally named "\xe9" is "\x5cxe9", and decoding gives back the bytes.
_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")
_LITERAL_ESCAPE = re.compile(rb"\\(?=x[0-9a-f]{2})")


def _printable_path(path: str) -> str:
    """A path as valid UTF-8 text that maps back to exactly one path (see `_decoded_path`)."""
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    raw = _LITERAL_ESCAPE.sub(rb"\\x5c", os.fsencode(path))
    return raw.decode("utf-8", "backslashreplace")


def _decoded_path(path: str) -> bytes:
    """The raw path bytes behind a `_printable_path` text."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), os.fsencode(path))


class LocalStorage(Storage):
    """Local (or mounted network) filesystem. URIs are absolute paths."""

    scheme = "file"
    leaves_temp_files = True

    @staticmethod
    def _path(uri: str) -> str:
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        return os.path.abspath(os.path.expanduser(uri))

    def _os_path(self, uri: str):
        """The path to open: the raw bytes behind a listed URI's escapes, else `uri` itself (a path
        that was never listed, e.g. DST, may hold a literal "\\xNN")."""
        path = self._path(uri)
        if "\\x" in path:
            raw = _decoded_path(path)
            if os.path.lexists(raw) or not os.path.lexists(path):
                return raw
        return path

    def list_files(self, root, extensions=IMAGE_EXTENSIONS):
        root = self._path(root)
        if not os.path.isdir(root):
            raise StorageError(f"input folder does not exist or is not a folder: {root}")

        def unreadable(exc: OSError):
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # removed while listing: its images are really gone
            # An unreadable folder must not look like "every image in it was removed".
            raise StorageError(f"cannot list folder {_printable_path(exc.filename or root)}: "
                               f"{exc.strerror or type(exc).__name__}; fix its permissions or mount") from None

        def folder(dirpath: str):
            """The folder's visible entries as (sort key, path, is a folder), in the order of their
            full paths: a folder's key is its name + "/", since everything under it starts so."""
            try:
                with os.scandir(dirpath) as entries:
                    items = []
                    for entry in entries:
                        # Hidden files and folders (.git, .ipynb_checkpoints, .Trash) are never datasets.
                        if entry.name.startswith("."):
                            continue
                        try:
                            is_dir = entry.is_dir()  # follows symlinks, like os.walk(followlinks=True)
                        except OSError:
                            is_dir = False
                        if not is_dir and not entry.name.lower().endswith(extensions):
                            continue
                        items.append((entry.name + "/" if is_dir else entry.name, entry.path, is_dir))
            except OSError as exc:
                unreadable(exc)
                return iter(())
            items.sort()
            return iter(items)

        # Depth first, each folder's entries sorted so that the URIs come out in string order (the
        # plan's order): the driver then has no listing to sort, which at 10M inputs would hold a
        # second copy of the URIs. Names that sort differently once made printable only cost that
        # sort. Real folders visited are remembered: a symlink cycle would otherwise never end.
        seen_dirs = {os.path.realpath(root)}
        stack = [folder(root)]
        while stack:
            for _, path, is_dir in stack[-1]:
                if is_dir:
                    real = os.path.realpath(path)
                    if real in seen_dirs:
                        continue
                    seen_dirs.add(real)
                    stack.append(folder(path))
                    break  # into the subfolder; this folder's iterator resumes after it
                try:
                    st = os.stat(path)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP):
                        continue  # dangling symlink or symlink loop: nothing to read
                    unreadable(exc)  # raises, unless the file went away with its folder
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO or device named *.jpg would block or never end a read
                yield FileEntry(uri=_printable_path(path), size=st.st_size,
                                version=f"{st.st_size}:{st.st_mtime_ns}")
            else:
                stack.pop()

    def list_names(self, prefix_uri):
        root = self._path(prefix_uri)
        if not os.path.isdir(root):
            return
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                yield os.path.join(dirpath, name)

    def read_bytes(self, uri):
        with open(self._os_path(uri), "rb") as f:
            return f.read()

    def read_tail(self, uri, nbytes):
        with open(self._os_path(uri), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read()

    def content_version(self, entry):
        """"sha256:" + the first 32 hex digits of the file's SHA-256, read in 1 MiB blocks."""
        h = hashlib.sha256()
        try:
            with open(self._os_path(entry.uri), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise StorageError(f"cannot read {entry.uri} to hash it (--verify-content): "
                               f"{exc.strerror or type(exc).__name__}") from None
        return "sha256:" + h.hexdigest()[:32]

    def write_bytes(self, uri, data):
        with self.open_write(uri) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_write(self, uri):
        path = self._path(uri)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # Same folder (os.replace is atomic only within one filesystem); hidden name, see TEMP_PREFIX.
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

    def exists(self, uri):
        return os.path.exists(self._path(uri))

    def stat(self, uri):
        st = os.stat(self._os_path(uri))
        return FileEntry(uri=uri, size=st.st_size, version=str(st.st_mtime_ns))

    def delete(self, uri):
        try:
            os.remove(self._path(uri))
        except FileNotFoundError:
            pass

    def delete_tree(self, prefix_uri):
        import shutil

        shutil.rmtree(self._path(prefix_uri), ignore_errors=True)  # the folders too, not only the files

    def join(self, base, *parts):
        return os.path.join(self._path(base), *parts)

    def is_inside(self, child, parent):
        child, parent = os.path.realpath(self._path(child)), os.path.realpath(self._path(parent))
        return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)

    def filesystem(self, root):
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), self._path(root)

    def normalize(self, uri: str) -> str:
        return self._path(uri)

    # -- conditional writes: a create is link(2) of a complete temp file (atomic, fails if the name
    # exists like O_EXCL, and never shows a half-written file); a replace or delete compares versions
    # under an flock on the object's folder (no lock file left behind), so check and write are one
    # step for every process that uses these methods on that folder.

    def _write_temp(self, path: str, data: bytes) -> str:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}{TEMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def _store_now(self, folder: str) -> float:
        """The clock that stamps files in `folder` (a network filesystem's server, not ours)."""
        probe = self._write_temp(os.path.join(folder, "clock"), b"")
        try:
            return os.stat(probe).st_mtime
        finally:
            os.remove(probe)

    @contextlib.contextmanager
    def _cas_lock(self, path: str):
        import fcntl

        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def read_versioned(self, uri):
        path = self._path(uri)
        try:
            with open(path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Versioned(data, hashlib.sha256(data).hexdigest(), modified,
                         self._store_now(os.path.dirname(path)))

    def create_versioned(self, uri, data):
        path = self._path(uri)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            return None
        finally:
            os.remove(tmp)
        return hashlib.sha256(data).hexdigest()

    def replace_versioned(self, uri, data, expected_version):
        path = self._path(uri)
        with self._cas_lock(path):
            try:
                with open(path, "rb") as f:
                    current = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError:
                return None
            if current != expected_version:
                return None
            self.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def delete_versioned(self, uri, expected_version):
        path = self._path(uri)
        with self._cas_lock(path):
            try:
                with open(path, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != expected_version:
                        return False
            except FileNotFoundError:
                return False
            os.remove(path)
        return True

    def check_access(self, uri, write=False):
        """For outputs: the folder can be created and written (read-only folder, /sys, a path
        under a file). Leaves nothing behind: a probe file and any folder made here are removed."""
        from bulk_explain.workers.environment import EnvironmentProblem

        if not write:
            return
        path = self._path(uri)
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise EnvironmentProblem(
                f"cannot write output {path}: {existing} is a file, not a folder; choose another --output")
        created = []
        try:
            missing = []
            folder = path
            while not os.path.lexists(folder):
                missing.append(folder)
                folder = os.path.dirname(folder)
            for folder in reversed(missing):
                os.mkdir(folder)
                created.append(folder)
            probe = os.path.join(path, f"{TEMP_PREFIX}{uuid.uuid4().hex}-write-probe{TEMP_SUFFIX}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot write output {path}: {exc.strerror or exc}; choose a writable --output "
                "or fix the folder's permissions") from None
        finally:
            for folder in reversed(created):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass


_BACKENDS: Dict[str, Callable[[], Storage]] = {"file": LocalStorage}
_INSTANCES: Dict[str, Storage] = {}
_OPTIONS: Dict[str, dict] = {}  # scheme -> keyword arguments its backend is built with


def configure_storage(scheme: str, **options) -> dict:
    """Sets the keyword arguments `storage_for` builds the `scheme` backend with in this process
    (the job's S3 `endpoint_url`: passed explicitly by the driver and by each worker from its
    settings, never through os.environ). None values are dropped; no options = the defaults.

    Returns:
        The previous options, to restore them later.
    """
    previous = dict(_OPTIONS.get(scheme, {}))
    options = {k: v for k, v in options.items() if v is not None}
    if options != previous:
        if options:
            _OPTIONS[scheme] = options
        else:
            _OPTIONS.pop(scheme, None)
        _INSTANCES.pop(scheme, None)  # the next storage_for builds one with the new options
    return previous


def register_storage(scheme: str, factory: Callable[[], Storage]) -> None:
    """Registers a backend for `scheme://` URIs."""
    _BACKENDS[scheme] = factory


def reset_storage_cache() -> None:
    """Forgets the cached backend instances, so the next `storage_for` builds them again from the
    current environment (tests change endpoints and credentials between cases)."""
    _INSTANCES.clear()


def scheme_of(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def storage_for(uri: str) -> Storage:
    """Returns the (cached) backend for `uri`.

    Raises:
        StorageError: no backend for the URI's scheme.
    """
    scheme = scheme_of(uri)
    if scheme not in _BACKENDS:
        _load_optional_backends()
    if scheme not in _BACKENDS:
        raise StorageError(
            f"unsupported storage scheme {scheme!r} in {uri!r}; expected a local path or one of "
            + ", ".join(f"{s}://" for s in sorted(_BACKENDS) if s != "file")
        )
    if scheme not in _INSTANCES:
        _INSTANCES[scheme] = _BACKENDS[scheme](**_OPTIONS.get(scheme, {}))
    return _INSTANCES[scheme]


def normalize_uri(uri: str) -> str:
    """Absolute form of a URI: local paths made absolute, remote URIs unchanged."""
    backend = storage_for(uri)
    return backend.normalize(uri) if hasattr(backend, "normalize") else uri


def _load_optional_backends() -> None:
    # Backends with heavy imports (boto3) register themselves when imported.
    try:
        from bulk_explain.workers import storage_s3  # noqa: F401
    except ImportError:
        pass
