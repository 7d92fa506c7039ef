"""FeatureCache: content keys, LRU order, byte bound, counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_medplib.pipeline.cache import FeatureCache, content_key, nbytes_of
from monai_medplib.pipeline.features import ImageFeatures


def _feats(fill: float, n: int = 256) -> ImageFeatures:
    # n float32 in clip + n in the embedding -> 8 n bytes
    return ImageFeatures(torch.full((n,), fill), (8, 8), (4, 4), torch.full((n,), fill), key="k")


def test_content_key_depends_on_bytes_shape_dtype_and_tag():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_key(a) == content_key(a.copy())
    assert content_key(a) == content_key(torch.from_numpy(a.copy()))
    assert content_key(a) != content_key(a.reshape(4, 3))
    assert content_key(a) != content_key(a.astype(np.int16))
    assert content_key(a) != content_key(a, "model-2")
    b = a.copy()
    b[2, 3] += 1
    assert content_key(a) != content_key(b)
    # a non-contiguous view is keyed by its values, like the contiguous copy
    assert content_key(a.T) == content_key(np.ascontiguousarray(a.T))


def test_nbytes_walks_dataclasses_and_containers():
    assert nbytes_of(_feats(0.0, 10)) == 80
    assert nbytes_of({"a": torch.zeros(3, dtype=torch.float64), "b": [np.zeros(5, np.uint8)]}) == 29
    assert nbytes_of("text") == 0


def test_lru_eviction_by_bytes_and_counters():
    cache = FeatureCache(max_bytes=3 * 2048)  # room for three 2 KiB entries
    for name in "abc":
        cache.put(name, _feats(1.0))
    assert len(cache) == 3 and cache.nbytes == 3 * 2048
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", _feats(2.0))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.stats.evictions == 1 and cache.stats.hits == 1
    assert cache.get("b") is None and cache.stats.misses == 1
    # replacing a key does not double-count its bytes
    cache.put("d", _feats(3.0))
    assert cache.nbytes == 3 * 2048 and float(cache.get("d").clip_feats[0]) == 3.0


def test_oversize_value_is_returned_not_stored_and_zero_disables():
    cache = FeatureCache(max_bytes=1000)
    value = cache.get_or_compute("big", lambda: _feats(1.0))
    assert value.clip_feats.numel() == 256 and "big" not in cache and cache.nbytes == 0
    calls = []
    small = FeatureCache(max_bytes=10_000)
    for _ in range(3):
        small.get_or_compute("k", lambda: calls.append(1) or _feats(0.5))
    assert len(calls) == 1 and small.stats.hits == 2
    assert len(FeatureCache(0)) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(-1)


def test_clear_resets():
    cache = FeatureCache(10_000)
    cache.put("x", _feats(0.0))
    cache.get("x")
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.stats.hits == 0


def test_concurrent_puts_keep_the_byte_bound():
    import threading

    cache = FeatureCache(max_bytes=8 * 2048)  # eight 2 KiB entries

    def worker(offset: int) -> None:
        for i in range(200):
            cache.put(f"{offset}-{i}", _feats(float(i)))
            cache.get(f"{offset}-{i - 3}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 8 and cache.nbytes == 8 * 2048 and cache.stats.evictions == 4 * 200 - 8


def test_volume_cache_tells_intensity_objects_apart_even_with_one_repr():
    """Two mappings whose repr is the same (or a freed one's address reused by a new one) must not share a
    prepared volume: the model would see the other window."""
    from monai_medplib.pipeline.cache import VolumeCache

    class Window:
        def __init__(self, centre: float) -> None:
            self.centre = centre

        def __repr__(self) -> str:
            return "Window()"

    cache, volume = VolumeCache(max_bytes=1 << 20, max_entries=4), torch.zeros(1, 4, 4, 4)
    lung, brain = Window(-600.0), Window(40.0)
    assert cache.get(volume, lambda: "lung-prepared", lung) == "lung-prepared"
    assert cache.get(volume, lambda: "brain-prepared", brain) == "brain-prepared"
    assert cache.get(volume, lambda: "again", lung) == "lung-prepared"  # the same object still hits
    assert (
        cache.get(volume, lambda: "by name", "samed2d")
        == "by name"
        == cache.get(volume, lambda: "x", "samed2d")
    )
    assert VolumeCache.key_of(volume, {"unhashable": 1}) is None  # not cached rather than keyed wrongly


def test_a_volume_edited_through_a_numpy_view_is_prepared_again():
    """Writes through ``tensor.numpy()`` (or DLPack) leave torch's version counter as it was: the cache handed back
    the volume as it was before the edit."""
    from monai_medplib.pipeline.cache import VolumeCache

    cache, volume = VolumeCache(max_bytes=1 << 20, max_entries=4), torch.zeros(1, 4, 4, 4)
    assert cache.get(volume, lambda: "before", "samed2d") == "before"
    version = volume._version
    volume.numpy()[0, :, :, 2] = 7.0
    assert volume._version == version  # torch did not see the write
    assert cache.get(volume, lambda: "after", "samed2d") == "after"
    volume.add_(1.0)  # an in-place torch edit, as before
    assert cache.get(volume, lambda: "again", "samed2d") == "again"
    assert cache.get(volume, lambda: "not prepared", "samed2d") == "again" and cache.prepared == 3
