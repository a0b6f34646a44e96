"""Decoded tiles kept for exactly as long as a planned read still needs them.

A scan reads every tissue block once, with a margin, so neighbouring blocks share the tiles
along their common edges. Decoding those tiles once per block made the scan decode far more
pixels than it needs (docs/benchmarks.md, "The tile cache"). Because the scan knows every read
before it starts, the cache is told the reads up front: each tile carries the number of planned
reads still to use it, is kept while that number is positive and dropped at its last use.
Memory is then the tiles on the edges of blocks not yet read (the cache's measured peak:
docs/benchmarks.md), not a block row's worth, and a tile is decoded once whatever the order the
threads take the blocks in. ``max_bytes`` bounds memory when plans and reads disagree (another
process read some of the blocks, a scan failed).

Reads that were not planned (thumbnails, tools) use tiles that happen to be cached but never
count against a plan.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import numpy as np

TileKey = tuple[int, int, int]  # level, tile column, tile row


@dataclass
class ReadStats:
    """What the reads of a slide handle cost: tiles and pixels decoded, cache hits."""

    tiles_decoded: int = 0
    px_decoded: int = 0
    tiles_from_cache: int = 0
    peak_cache_bytes: int = 0


class TileCache:
    """Thread-safe: one thread decodes a tile, the others needing it wait for that decode."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._tiles: OrderedDict[TileKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._uses: Counter[TileKey] = Counter()  # planned reads still to use each tile
        self._reads: Counter[Hashable] = Counter()  # planned reads not yet made
        self._decoding: dict[TileKey, threading.Event] = {}

    def expect(self, read: Hashable, tiles: Iterable[TileKey]) -> None:
        """Announce a future read and the tiles it will use."""
        with self._lock:
            self._reads[read] += 1
            self._uses.update(tiles)

    def forget(self) -> None:
        """Drop every plan and tile: the end of a scan, finished or not."""
        with self._lock:
            self._reads.clear()
            self._uses.clear()
            self._tiles.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def begin_read(self, read: Hashable) -> bool:
        """Whether this read was planned (then its tile uses are counted down)."""
        with self._lock:
            if self._reads[read] > 0:
                self._reads[read] -= 1
                return True
            self._reads.pop(read, None)
            return False

    def tiles(
        self, keys: list[TileKey], planned: bool, decode: Callable[[TileKey], np.ndarray]
    ) -> Iterable[tuple[TileKey, np.ndarray]]:
        """Each tile of ``keys``, from the cache or decoded; tiles another thread is decoding
        are taken last, so that both threads keep working meanwhile."""
        waiting: list[tuple[TileKey, threading.Event]] = []
        for key in keys:
            tile, event = self._claim(key, planned)
            if tile is not None:
                yield key, tile
            elif event is None:
                yield key, self._decode(key, planned, decode)
            else:
                waiting.append((key, event))
        for key, event in waiting:
            event.wait()
            with self._lock:
                tile = self._take(key, planned)
            # not there: the other decode failed or the byte bound evicted it; decode it here
            yield key, tile if tile is not None else self._decode(key, planned, decode)

    def _claim(self, key: TileKey, planned: bool) -> tuple[np.ndarray | None, threading.Event | None]:
        """The cached tile; else the event of another thread's decode of it; else (None, None)
        and this thread now owns the decode."""
        with self._lock:
            tile = self._take(key, planned)
            if tile is not None:
                return tile, None
            event = self._decoding.get(key)
            if event is not None:
                return None, event
            self._decoding[key] = threading.Event()
            return None, None

    def _take(self, key: TileKey, planned: bool) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is None:
            return None
        self.stats.tiles_from_cache += 1
        if planned:
            self._use(key)
        return tile

    def _use(self, key: TileKey) -> None:
        """One planned use of ``key`` happened: drop the tile after its last one."""
        left = self._uses[key] - 1
        if left > 0:
            self._uses[key] = left
            return
        self._uses.pop(key, None)
        tile = self._tiles.pop(key, None)
        if tile is not None:
            self._bytes -= tile.nbytes

    def _decode(self, key: TileKey, planned: bool, decode: Callable[[TileKey], np.ndarray]) -> np.ndarray:
        try:
            tile = decode(key)
        except BaseException:
            with self._lock:
                event = self._decoding.pop(key, None)
            if event is not None:
                event.set()
            raise
        with self._lock:
            self.stats.tiles_decoded += 1
            self.stats.px_decoded += tile.shape[0] * tile.shape[1]
            if planned:
                self._use(key)
            if self._uses[key] > 0 and key not in self._tiles:
                self._tiles[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > self.max_bytes and self._tiles:
                    _, old = self._tiles.popitem(last=False)
                    self._bytes -= old.nbytes
                self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self._bytes)
            # stored (or dropped) before the waiters wake, so they find it
            event = self._decoding.pop(key, None)
        if event is not None:
            event.set()
        return tile
