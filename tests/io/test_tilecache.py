from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from wsi_scan.io.tilecache import TileCache, TileKey


def _tile(key: TileKey) -> np.ndarray:
    return np.full((4, 4, 3), (key[1] * 16 + key[2]) % 256, dtype=np.uint8)


class _Decoder:
    def __init__(self) -> None:
        self.calls: Counter[TileKey] = Counter()
        self._lock = threading.Lock()

    def __call__(self, key: TileKey) -> np.ndarray:
        with self._lock:
            self.calls[key] += 1
        return _tile(key)


def _keys(x0: int, y0: int, n: int) -> list[TileKey]:
    return [(0, x, y) for y in range(y0, y0 + n) for x in range(x0, x0 + n)]


def test_planned_reads_decode_each_tile_once_and_leave_nothing_behind():
    reads = {f"r{i}": _keys(2 * i, 0, 3) for i in range(5)}  # neighbours share a column of tiles
    cache, dec = TileCache(1 << 30), _Decoder()
    for name, keys in reads.items():
        cache.expect(name, keys)
    for name, keys in reads.items():
        planned = cache.begin_read(name)
        got = dict(cache.tiles(keys, planned, dec))
        assert planned and set(got) == set(keys)
        assert all(np.array_equal(t, _tile(k)) for k, t in got.items())
    distinct = {k for keys in reads.values() for k in keys}
    assert set(dec.calls) == distinct and max(dec.calls.values()) == 1
    assert cache.stats.tiles_decoded == len(distinct)
    assert cache.stats.tiles_from_cache == sum(len(k) for k in reads.values()) - len(distinct)
    assert cache.nbytes == 0  # every tile left at its last planned use


def test_unplanned_reads_neither_keep_tiles_nor_spend_planned_uses():
    cache, dec = TileCache(1 << 30), _Decoder()
    cache.expect("a", _keys(0, 0, 2))
    assert not cache.begin_read("thumbnail")
    list(cache.tiles(_keys(0, 0, 2), False, dec))  # same tiles, not the planned read
    assert cache.nbytes == 4 * 48  # decoded by the unplanned read, kept for "a"
    assert cache.begin_read("a")
    list(cache.tiles(_keys(0, 0, 2), True, dec))
    assert cache.nbytes == 0 and sum(dec.calls.values()) == 4
    assert not cache.begin_read("a")  # a read planned once is planned once


def test_byte_bound_evicts_oldest_tiles_and_reads_stay_correct():
    cache, dec = TileCache(3 * 48), _Decoder()
    reads = {f"r{i}": _keys(0, 0, 3) for i in range(3)}  # 9 tiles, all shared, only 3 fit
    for name, keys in reads.items():
        cache.expect(name, keys)
    for name, keys in reads.items():
        got = dict(cache.tiles(keys, cache.begin_read(name), dec))
        assert all(np.array_equal(t, _tile(k)) for k, t in got.items())
        assert cache.nbytes <= 3 * 48
    assert cache.stats.peak_cache_bytes <= 3 * 48
    cache.forget()
    assert cache.nbytes == 0


def test_threads_share_decodes_and_every_read_gets_its_pixels():
    cache, dec = TileCache(1 << 30), _Decoder()
    reads = {(i, j): _keys(3 * i, 3 * j, 5) for i in range(6) for j in range(6)}  # 2-tile overlaps
    for name, keys in reads.items():
        cache.expect(name, keys)

    def read(name: tuple[int, int]) -> bool:
        keys = reads[name]
        got = dict(cache.tiles(keys, cache.begin_read(name), dec))
        return set(got) == set(keys) and all(np.array_equal(t, _tile(k)) for k, t in got.items())

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, list(reads)))
    assert max(dec.calls.values()) == 1  # a tile in flight is waited for, not decoded again
    assert cache.nbytes == 0


def test_a_failed_decode_raises_and_the_next_read_decodes_again():
    cache = TileCache(1 << 30)
    cache.expect("a", _keys(0, 0, 1))
    cache.expect("b", _keys(0, 0, 1))

    def broken(key: TileKey) -> np.ndarray:
        raise OSError("truncated")

    with pytest.raises(OSError):
        list(cache.tiles(_keys(0, 0, 1), cache.begin_read("a"), broken))
    got = dict(cache.tiles(_keys(0, 0, 1), cache.begin_read("b"), _Decoder()))
    assert np.array_equal(got[(0, 0, 0)], _tile((0, 0, 0)))
