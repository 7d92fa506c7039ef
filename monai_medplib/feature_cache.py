"""The one cache of the pipeline: a content-keyed, thread-safe LRU bounded by the bytes of what it holds.

Interactive use asks several questions about the same image or slice; the two image encoders and the image part
of the prompt cost far more than a question, so :class:`~monai_medplib.features.ImageFeatures` (and the
prompt-prefix KV states of the grounding shortcut) are kept, keyed by the bytes of the 8-bit image (not by object
identity or file name: a re-loaded or re-cut slice with the same pixels hits). ``MedPLIBPipeline`` creates one
(:data:`DEFAULT_CACHE_BYTES`) shared by its 2D and volume methods.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_CACHE_BYTES", "CacheStats", "FeatureCache", "content_key", "nbytes_of"]

DEFAULT_CACHE_BYTES = 512 * 1024**2


def content_key(array: np.ndarray | torch.Tensor, *extra: Hashable) -> str:
    """A digest of an array's shape, dtype and bytes, plus any ``extra`` tags (model identity, dtype, ...)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
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
