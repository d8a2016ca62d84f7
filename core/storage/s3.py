"""The S3 backend (any S3-compatible store: AWS, SeaweedFS, MinIO, Ceph), through ``obstore``.

``obstore`` was chosen by measurement against boto3 (see docs/SERVICE.md, "Object storage"): no
dependencies, a tenth of the import time, one client for sync and async, multipart uploads from a
stream, and faster small range reads (what Deep Zoom tiles are made of). Every call is bounded by
``storage_timeout_s`` and retried ``storage_retries`` times inside obstore; what still fails is
``StorageUnavailable`` (``ObjectMissing`` for a missing key).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from core.settings import ConfigError, Settings
from core.storage.base import ObjectInfo, Writer
from core.storage.errors import ObjectMissing, StorageUnavailable

READY_PROBE = ".nucseg-ready"  # a key that need not exist: a HEAD that gets an answer proves the store up

log = logging.getLogger(__name__)
T = TypeVar("T")
PART_BYTES = 8 << 20  # multipart part size (S3's minimum is 5 MiB)
READ_BUFFER = 256 << 10  # range size of ``open_reader`` (a TIFF directory read costs one request)
_lock = threading.Lock()
_clients: dict[tuple[str, str, int], S3Storage] = {}


def is_s3_url(text: str) -> bool:
    return text.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; ``ConfigError`` if malformed."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{url!r} is not an S3 URL of the form s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def s3_storage(url: str, settings: Settings) -> S3Storage:
    """The store at ``s3://bucket/prefix`` (one client per bucket, prefix and settings, per process)."""
    key = (url.rstrip("/"), settings.s3_endpoint_url or "", id(settings))
    with _lock:
        if key not in _clients:
            _clients[key] = S3Storage(url.rstrip("/"), settings)
        return _clients[key]


def _call(what: str, key: str, fn: Callable[[], T]) -> T:
    """Run one store call, translating obstore's errors into ours."""
    try:
        return fn()
    except (NotFoundError, FileNotFoundError) as exc:
        raise ObjectMissing(f"no object {key!r}") from exc
    except (BaseError, OSError, RuntimeError) as exc:  # OSError: connection refused or reset
        log.warning("object store: %s %r failed: %s", what, key, " ".join(str(exc).split())[:1000])
        raise StorageUnavailable(f"the object store failed to {what} {key!r} ({type(exc).__name__}; "
                                 "details in the server log)") from exc


class S3Storage:
    """Objects under ``s3://bucket/prefix/``."""

    def __init__(self, url: str, settings: Settings) -> None:
        bucket, prefix = split_s3_url(url)
        self.url, self.bucket = url, bucket
        self.store = S3Store(bucket, prefix=prefix or None, **_client_options(settings))

    def head(self, key: str) -> ObjectInfo:
        meta = _call("read", key, lambda: obstore.head(self.store, key))
        return _info(key, meta)

    def read(self, key: str) -> bytes:
        return bytes(_call("read", key, lambda: obstore.get(self.store, key).bytes()))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return bytes(_call("read", key, lambda: obstore.get_range(self.store, key, start=start, length=length)))

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The request is made here (its failure raises now); the chunks come as they are read."""
        rng: dict[str, Any] = {"range": (start, end)} if end is not None else ({"range": {"offset": start}}
                                                                             if start else {})
        result = _call("read", key, lambda: obstore.get(self.store, key, options=rng))  # type: ignore[arg-type]
        return _chunks(iter(result.stream(min_chunk_size=1 << 20)), key)

    def open_reader(self, key: str) -> IO[bytes]:
        reader = _call("open", key, lambda: obstore.open_reader(self.store, key, buffer_size=READ_BUFFER))
        return _GuardedReader(reader, key)  # type: ignore[return-value]

    @contextmanager
    def writer(self, key: str) -> Iterator[Writer]:
        """A multipart upload; leaving the block by an exception aborts it (no object appears)."""
        handle = _call("write", key, lambda: obstore.open_writer(self.store, key, buffer_size=PART_BYTES))
        try:
            yield _GuardedWriter(handle, key)
        except BaseException:
            _abort(handle)
            raise
        _call("write", key, handle.close)

    def put_file(self, key: str, path: Path) -> None:
        _call("write", key, lambda: obstore.put(self.store, key, path, chunk_size=PART_BYTES))

    def download(self, key: str, dest: Path) -> None:
        with dest.open("wb") as out:
            for block in self.stream(key):
                out.write(block)

    def delete_prefix(self, prefix: str) -> None:
        keys = [meta["path"] for batch in self._list(prefix) for meta in batch]
        for start in range(0, len(keys), 1000):
            _call("delete", prefix, lambda s=start: obstore.delete(self.store, keys[s:s + 1000]))  # type: ignore[misc]

    def folders(self, prefix: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for batch in self._list(prefix):
            for meta in batch:
                name = meta["path"][len(prefix) + 1:].split("/", 1)[0]
                found[name] = max(found.get(name, 0.0), meta["last_modified"].timestamp())
        return found

    def _list(self, prefix: str) -> list[Any]:
        return _call("list", prefix, lambda: list(obstore.list(self.store, prefix.rstrip("/") + "/",
                                                                chunk_size=1000)))

    def check(self) -> None:
        with suppress(ObjectMissing):  # an answer is all we ask for
            self.head(READY_PROBE)

    def local_path(self, key: str) -> Path | None:
        return None


def _chunks(chunks: Iterator[Any], key: str) -> Iterator[bytes]:
    while (block := _call("read", key, lambda: next(chunks, None))) is not None:
        yield bytes(block)


def _client_options(settings: Settings) -> dict[str, Any]:
    timeout = timedelta(seconds=settings.storage_timeout_s)
    options: dict[str, Any] = {
        "region": settings.s3_region,
        "client_options": {"timeout": timeout, "connect_timeout": min(timeout, timedelta(seconds=5))},
        "retry_config": {"max_retries": settings.storage_retries, "retry_timeout": timeout,
                         "backoff": {"init_backoff": timedelta(milliseconds=100),
                                     "max_backoff": timedelta(seconds=2), "base": 2}},
    }
    if settings.s3_endpoint_url:
        options["endpoint"] = settings.s3_endpoint_url
        options["virtual_hosted_style_request"] = False
        options["client_options"]["allow_http"] = settings.s3_endpoint_url.startswith("http://")
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        options["access_key_id"] = settings.aws_access_key_id.get_secret_value()
        options["secret_access_key"] = settings.aws_secret_access_key.get_secret_value()
    return options


def _info(key: str, meta: Any) -> ObjectInfo:
    return ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp(), str(meta.get("e_tag") or ""))


def _abort(handle: Any) -> None:
    with suppress(Exception):
        handle.__exit__(RuntimeError, RuntimeError("aborted"), None)


class _GuardedWriter:
    def __init__(self, handle: Any, key: str) -> None:
        self.handle, self.key = handle, key

    def write(self, data: bytes, /) -> int:
        return int(_call("write", self.key, lambda: self.handle.write(data)))


class _GuardedReader:
    """obstore's ``ReadableFile`` with our errors (tifffile reads through it)."""

    def __init__(self, reader: Any, key: str) -> None:
        self.reader, self.key = reader, key

    def read(self, size: int = -1, /) -> bytes:
        return bytes(_call("read", self.key, lambda: self.reader.read(None if size < 0 else size)))

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return int(_call("read", self.key, lambda: self.reader.seek(offset, whence)))

    def tell(self) -> int:
        return int(self.reader.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.reader.close()

    @property
    def closed(self) -> bool:
        return False

    def __enter__(self) -> _GuardedReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
