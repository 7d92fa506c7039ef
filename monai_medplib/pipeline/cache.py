"""The pipeline's caches, each a thread-safe LRU bounded by the bytes of what it holds.

* :class:`FeatureCache`: interactive use asks several questions about the same image or slice; the two image
  encoders and the image part of the prompt cost far more than a question, so
  :class:`~monai_medplib.pipeline.features.ImageFeatures` (and the prompt-prefix KV states of the grounding
  shortcut) are kept, keyed by the bytes of the 8-bit image (not by object identity or file name: a re-loaded or
  re-cut slice with the same pixels hits).
* :class:`VolumeCache`: the last normalised volumes by source (file path + mtime, or tensor identity + version), so
  interactive calls on one volume read and normalise it once. Single-flight: concurrent requests for the same
  volume wait for one decode instead of each decoding it.

:class:`~monai_medplib.pipeline.runner.MedPLIBRunner` creates one of each and shares them between its 2D and volume
calls.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..processing import as_numpy

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_VOLUME_CACHE_BYTES",
    "CacheStats",
    "FeatureCache",
    "VolumeCache",
    "content_key",
    "nbytes_of",
]

DEFAULT_CACHE_BYTES = 512 * 1024**2
DEFAULT_VOLUME_CACHE_BYTES = 1024**3  # a 512x512x300 CT as float32 plus its uint8 copy is ~0.4 GB


def content_key(array: np.ndarray | torch.Tensor, *extra: Hashable) -> str:
    """A digest of an array's shape, dtype and bytes, plus any ``extra`` tags (model identity, dtype, ...)."""
    if isinstance(array, torch.Tensor):
        array = as_numpy(array)
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}|{extra!r}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def nbytes_of(value: Any) -> int:
    """Bytes held by the tensors / arrays inside ``value`` (dataclasses, tuples, lists and dicts are walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, list | tuple):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    return 0


@dataclass
class CacheStats:
    """Counters of a :class:`FeatureCache` since creation (or the last :meth:`FeatureCache.clear`)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class FeatureCache:
    """Thread-safe LRU mapping ``key -> value`` bounded by the tensor bytes of the values.

    Args:
        max_bytes: capacity; a value larger than this on its own is returned but not stored. 0 disables caching.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def get(self, key: str) -> Any | None:
        """The cached value (marked most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, evicting least recently used entries to stay within ``max_bytes``."""
        size = nbytes_of(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
                self.stats.evictions += 1

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value, or ``compute()`` stored and returned."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.stats = CacheStats()


class VolumeCache:
    """The last prepared volumes by source, bounded in bytes, single-flight under concurrency.

    Keys: a file path with its mtime and size (a replaced file is read again), or a tensor's storage, shape,
    strides and a digest of its bytes (a tensor modified in place, by torch or through a numpy view, is prepared
    again; held weakly, so the cache never keeps a caller's tensor alive). Sources with no stable key (anything
    else) are prepared and not stored.

    Args:
        max_bytes: capacity (tensor bytes of the prepared values); a value larger than this is not stored.
        max_entries: at most this many volumes are kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_VOLUME_CACHE_BYTES, max_entries: int = 2) -> None:
        if max_bytes < 0 or max_entries < 0:
            raise ValueError(f"max_bytes and max_entries must be >= 0, got {max_bytes}, {max_entries}")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self.prepared = 0  # how many times a volume was prepared (decoded and normalised)
        self._entries: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()  # key -> (ref, value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @staticmethod
    def key_of(source: Any, *extra: Hashable) -> tuple | None:
        """The cache key of ``source`` (None when it or an ``extra`` has no stable identity)."""
        tags = []
        for tag in extra:
            if tag is None or isinstance(tag, str | int | float):
                tags.append(repr(tag))
                continue
            try:  # an object (a transform, a function): the key holds it, so its id cannot be reused meanwhile
                hash(tag)
            except TypeError:
                return None
            tags.append(("object", id(tag), tag))
        if isinstance(source, str | Path):
            path = Path(source)
            try:
                stat = path.stat()
            except OSError:
                return None
            return ("path", str(path.resolve()), stat.st_mtime_ns, stat.st_size, *tags)
        if isinstance(source, torch.Tensor):
            # the bytes, not the version counter: a write through a numpy view or DLPack leaves _version as it was
            return (
                "tensor",
                source.data_ptr(),
                tuple(source.shape),
                source.stride(),
                content_key(source),
                *tags,
            )
        return None

    def _lookup(self, key: tuple, source: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        ref, value, _ = entry
        if ref is not None and ref() is not source:  # the tensor died and its storage was reused
            return None
        self._entries.move_to_end(key)
        return value

    def get(self, source: Any, prepare: Callable[[], Any], *extra: Hashable) -> Any:
        """The prepared value of ``source`` (``extra`` tags the key, e.g. the intensity mapping): from the cache,
        or ``prepare()`` run once even when several threads ask at the same time."""
        key = self.key_of(source, *extra)
        if key is None or self.max_entries == 0:
            with self._lock:
                self.prepared += 1
            return prepare()
        with self._lock:
            hit = self._lookup(key, source)
            if hit is not None:
                return hit
            flight = self._inflight.setdefault(key, threading.Lock())
        with flight:  # one thread prepares; the others wait here and then find the entry
            with self._lock:
                hit = self._lookup(key, source)
                if hit is not None:
                    return hit
            try:
                value = prepare()
                self._store(key, source, value)  # before the flight ends: a later caller finds it
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
            return value

    def _store(self, key: tuple, source: Any, value: Any) -> None:
        size = nbytes_of(value)
        ref = weakref.ref(source) if isinstance(source, torch.Tensor) else None
        with self._lock:
            self.prepared += 1
            if size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._entries[key] = (ref, value, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
