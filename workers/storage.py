"""Storage seam: every byte the job reads or writes goes through a `Storage`.

A backend is one class registered for a URI scheme. The driver lists through it, workers read
images and write outputs through it; nothing else touches `open()` or boto3 directly, so a new
store (S3, GCS, ...) is one more subclass, not a branch in the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import uuid
from typing import Callable, Dict, Iterator

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
        version: what changes when the content changes (mtime_ns locally, ETag on S3).
    """

    uri: str
    size: int
    version: str


class StorageError(Exception):
    """A storage operation failed in a way the user must fix (missing root, no permission...)."""


class Storage:
    """Base class: one instance per URI scheme, safe to share between threads."""

    scheme: str = ""

    def list_files(self, root: str, extensions=IMAGE_EXTENSIONS) -> Iterator[FileEntry]:
        """Yields every file under `root` (recursive) whose name ends in one of `extensions`.

        Order is unspecified; the planner sorts.
        """
        raise NotImplementedError

    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Writes `data` so that readers see either nothing or all of it (atomic replace)."""
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        """Deletes `uri` if it exists."""
        raise NotImplementedError

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
            workers.environment.EnvironmentProblem: one line naming the fix.
        """


_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")


def _printable_path(path: str) -> str:
    """A path as valid UTF-8 text (Arrow strings must be): a name that is not UTF-8 on disk keeps
    its bytes >= 0x80 as "\\xNN" escapes, which `LocalStorage` maps back when it opens the file."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


class LocalStorage(Storage):
    """Local (or mounted network) filesystem. URIs are absolute paths."""

    scheme = "file"

    @staticmethod
    def _path(uri: str) -> str:
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        return os.path.abspath(os.path.expanduser(uri))

    def _os_path(self, uri: str):
        """The path to open: `uri` itself, or the raw bytes behind a `_printable_path` escape."""
        path = self._path(uri)
        if "\\x" in path and not os.path.lexists(path):
            return _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), os.fsencode(path))
        return path

    def list_files(self, root, extensions=IMAGE_EXTENSIONS):
        root = self._path(root)
        if not os.path.isdir(root):
            raise StorageError(f"input folder does not exist or is not a folder: {root}")
        seen_dirs = set()
        # os.walk(followlinks=True) loops forever on a symlink cycle: remember real dirs visited.
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            # Hidden folders (.git, .ipynb_checkpoints, .Trash) are never datasets.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or not name.lower().endswith(extensions):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # dangling symlink: nothing to read
                if not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO or device named *.jpg would block or never end a read
                yield FileEntry(uri=_printable_path(path), size=st.st_size, version=str(st.st_mtime_ns))

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

    def write_bytes(self, uri, data):
        path = self._path(uri)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # Same folder (os.replace is atomic only within one filesystem); hidden name, see TEMP_PREFIX.
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}{TEMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

    def exists(self, uri):
        return os.path.exists(self._path(uri))

    def delete(self, uri):
        try:
            os.remove(self._path(uri))
        except FileNotFoundError:
            pass

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

    def check_access(self, uri, write=False):
        """For outputs: the folder can be created and written (read-only folder, /sys, a path
        under a file). Leaves nothing behind: a probe file and any folder made here are removed."""
        from workers.environment import EnvironmentProblem

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


def register_storage(scheme: str, factory: Callable[[], Storage]) -> None:
    """Registers a backend for `scheme://` URIs."""
    _BACKENDS[scheme] = factory


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
        _INSTANCES[scheme] = _BACKENDS[scheme]()
    return _INSTANCES[scheme]


def normalize_uri(uri: str) -> str:
    """Absolute form of a URI: local paths made absolute, remote URIs unchanged."""
    backend = storage_for(uri)
    return backend.normalize(uri) if hasattr(backend, "normalize") else uri


def _load_optional_backends() -> None:
    # Backends with heavy imports (boto3) register themselves when imported.
    try:
        from workers import storage_s3  # noqa: F401
    except ImportError:
        pass
