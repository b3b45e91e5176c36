"""Near-duplicate detection with MinHash and LSH (datasketch).

A document is reduced to its set of word shingles (5 consecutive lower-cased words). The
Jaccard similarity of two such sets is estimated by MinHash: under a random permutation of
shingle hashes, the probability that both sets have the same minimum equals their Jaccard
similarity, so the share of equal minima over `NUM_PERM` permutations estimates it.
Locality-sensitive hashing cuts the signature into bands and buckets documents by band, so a
new document is compared only with those that share a bucket, not with all earlier ones; the
band layout is chosen by datasketch for the configured threshold. The first document of a
near-duplicate group is kept, later ones are dropped.

Shingles are hashed with CRC-32 (datasketch wants 32-bit values and the stronger default,
SHA-1, costs more than the rest of the curation together).
"""
from __future__ import annotations

import re
import zlib

from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
SHINGLE_WORDS = 5
_WORD = re.compile(r"\w+")


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def signature(text: str) -> MinHash:
    sig = MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32)
    sig.update_batch(list(shingles(text)))
    return sig


class NearDuplicateIndex:
    """Remembers kept documents; tells whether a new one is a near copy of one of them."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._signatures: dict[str, MinHash] = {}

    def match(self, key: str, text: str) -> tuple[str, float] | None:
        """(key of the earlier document, estimated Jaccard) for a near copy; else remember it."""
        sig = signature(text)
        for other in self._lsh.query(sig):
            similarity = sig.jaccard(self._signatures[other])
            if similarity >= self.threshold:
                return other, similarity
        self._lsh.insert(key, sig)
        self._signatures[key] = sig
        return None
