"""Which patches a model was trained on, recognised by their pixels.

A split's fingerprint (``PatchSet.fingerprint``) recognises the whole split under another folder
name, but not a part of it, nor training patches mixed with others. The card therefore also
carries a Bloom filter of the training patches' pixels (a blake2b digest of each decoded
96x96x3 patch): 56 KB for 31k patches at a false-positive rate of 1e-3, where the patches' ids
would be 4x that and miss a renamed copy. ``evaluate`` checks a seeded sample of the patches it
is given against it and warns when clearly more of them hit than false positives explain.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelError

KIND = "bloom-blake2b-v1"
FALSE_POSITIVE_RATE = 1e-3  # per patch never trained on
SAMPLE = 2000  # patches checked per evaluated set: the estimate's cost stays a few seconds
MAX_BITS = 1 << 27  # 16 MB: a filter from a card is data from a file
CHANCE = 1e-6  # hits are called "seen" when false positives alone would give as many this rarely


def _digest(patch: np.ndarray) -> tuple[int, int]:
    d = hashlib.blake2b(np.ascontiguousarray(patch, dtype=np.uint8).tobytes(), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1


@dataclass(frozen=True)
class PatchFilter:
    """A Bloom filter of patches: ``k`` bit positions per patch in ``m_bits`` (double hashing)."""

    m_bits: int
    k: int
    n: int
    bits: bytes

    @classmethod
    def build(cls, patches: Iterable[np.ndarray], n: int, rate: float = FALSE_POSITIVE_RATE) -> PatchFilter:
        m = max(64, math.ceil(-max(n, 1) * math.log(rate) / math.log(2) ** 2))
        m = (m + 7) // 8 * 8
        k = max(1, round(m / max(n, 1) * math.log(2)))
        bits = np.zeros(m // 8, dtype=np.uint8)
        # n counts distinct patches: a duplicate sets no new bit, and counting it would make the
        # card's own fill check (from_dict) call the filter damaged
        distinct: set[tuple[int, int]] = set()
        for patch in patches:
            digest = _digest(patch)
            if digest in distinct:
                continue
            distinct.add(digest)
            for pos in cls._positions_of(digest, m, k):
                bits[pos >> 3] |= np.uint8(1 << (pos & 7))
        return cls(m, k, len(distinct), bits.tobytes())

    @staticmethod
    def _positions_of(digest: tuple[int, int], m: int, k: int) -> list[int]:
        h1, h2 = digest
        return [(h1 + i * h2) % m for i in range(k)]

    def holds(self, digest: tuple[int, int]) -> bool:
        """Whether the patch of ``digest`` (``_digest``) may have been added."""
        return all(self.bits[pos >> 3] >> (pos & 7) & 1 for pos in self._positions_of(digest, self.m_bits, self.k))

    def __contains__(self, patch: np.ndarray) -> bool:
        return self.holds(_digest(patch))

    def fill(self) -> float:
        """The share of bits set."""
        return float(np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8)).mean())

    def false_positive_rate(self) -> float:
        """The chance that a patch never added hits, from the share of bits set."""
        return float(self.fill() ** self.k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "m_bits": self.m_bits,
            "k": self.k,
            "n": self.n,
            "bits": base64.b64encode(self.bits).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: Any) -> PatchFilter:
        """Read a card's filter; a damaged one raises ModelError (never a silent 'not seen')."""

        def bad(why: str) -> ModelError:
            return ModelError(f"model card field training.data.seen_patches: {why}; the card was edited or damaged")

        if not isinstance(d, Mapping) or d.get("kind") != KIND:
            raise bad(f"expected a {KIND!r} object, found {str(d)[:60]!r}")
        m, k, n = d.get("m_bits"), d.get("k"), d.get("n")
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (m, k, n))
        if not ints or not (64 <= m <= MAX_BITS and m % 8 == 0 and 1 <= k <= 64 and n >= 0):  # type: ignore[operator]
            raise bad(f"m_bits {m!r:.20}, k {k!r:.20}, n {n!r:.20} out of range")
        try:
            bits = base64.b64decode(str(d.get("bits", "")), validate=True)
        except ValueError:
            raise bad("bits is not base64") from None
        if len(bits) * 8 != m:
            raise bad(f"{len(bits) * 8} bits, m_bits says {m}")
        f = cls(int(m), int(k), int(n), bits)  # type: ignore[arg-type]
        # n patches at k bits each set a known share of the m bits: all ones would "recognise"
        # everything, all zeros (or an edited k or n) nothing, and both would pass silently
        want = 1.0 - math.exp(-f.k * f.n / f.m_bits)
        got = f.fill()
        if abs(got - want) > 0.02 + 6 * math.sqrt(want * (1 - want) / f.m_bits):
            raise bad(f"{got:.1%} of its bits are set where {f.n} patches at k = {f.k} set {want:.1%}")
        return f


@dataclass(frozen=True)
class SeenShare:
    """How many of a sample of patches a model's filters recognise."""

    checked: int
    hits: int
    expected_false: float

    @property
    def clearly_seen(self) -> bool:
        """More hits than false positives explain: as many would come by chance less often than
        ``CHANCE`` (a Poisson tail; 3 of 3 patches seen count, 5 of 2,000 do not)."""
        return self.hits > 0 and _poisson_tail(self.hits, self.expected_false) < CHANCE

    @property
    def share(self) -> float:
        """The share of the patches trained on, corrected for false positives."""
        if self.checked == 0:
            return 0.0
        return min(1.0, max(0.0, (self.hits - self.expected_false) / max(self.checked - self.expected_false, 1e-9)))

    def describe(self) -> str:
        pct = self.share * 100
        amount = "all" if pct >= 99.5 else f"about {pct:.0f}%" if pct >= 1 else "under 1%"
        return f"{amount} of these patches, recognised by their pixels ({self.hits} of {self.checked} checked)"


def _poisson_tail(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam)."""
    if lam <= 0:
        return 0.0 if k > 0 else 1.0
    term = math.exp(-lam)
    below = 0.0
    for j in range(k):
        below += term
        term *= lam / (j + 1)
    return max(0.0, 1.0 - below)


def seen_share(filters: list[PatchFilter], patches: Iterable[np.ndarray]) -> SeenShare:
    """Check ``patches`` against ``filters`` (a patch hits when any filter holds it)."""
    checked = hits = 0
    for patch in patches:
        checked += 1
        digest = _digest(patch)
        hits += any(f.holds(digest) for f in filters)
    rate = 1.0 - math.prod(1.0 - f.false_positive_rate() for f in filters)
    return SeenShare(checked, hits, checked * rate)


def sample_indices(n: int, size: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """A seeded sample of patch indices (all of them for small sets), in order."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
