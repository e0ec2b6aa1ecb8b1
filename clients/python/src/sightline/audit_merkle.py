"""RFC 6962 Merkle tree hashing, proofs and proof verification: the one implementation of these rules.

The gateway builds its audit log and proofs with this module, and ``sightline audit verify`` checks them
with it, offline: it needs only the standard library. Hashes follow RFC 6962 section 2.1:

- leaf hash ``SHA-256(0x00 || entry)``, node hash ``SHA-256(0x01 || left || right)``;
- the root of ``n`` leaves splits them at ``k``, the largest power of two below ``n``.

Inclusion and consistency proofs are RFC 6962's audit paths (section 2.1.1) and consistency proofs (2.1.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not prove what it claims; the message says which check failed."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two strictly below ``size`` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


class MerkleTree:
    """A tree over given leaf hashes, with every complete subtree's hash precomputed.

    Roots and proofs then cost O(log^2 n) hash lookups instead of rehashing the leaves: one tree serves
    every proof of an export.
    """

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        # levels[h][i] is the hash of the complete subtree of 2**h leaves starting at leaf i * 2**h.
        self._levels: list[list[bytes]] = [[]]
        self.extend(leaf_hashes)

    def extend(self, leaf_hashes: Sequence[bytes]) -> None:
        """Append leaves: a log only grows, so every subtree already hashed stays valid."""
        self._levels[0].extend(leaf_hashes)
        height = 0
        while len(self._levels[height]) > 1:
            if height + 1 == len(self._levels):
                self._levels.append([])
            below, above = self._levels[height], self._levels[height + 1]
            for i in range(2 * len(above), len(below) - 1, 2):
                above.append(node_hash(below[i], below[i + 1]))
            height += 1

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]); ``start`` is aligned to a power of two at least ``end - start`` (RFC splits are)."""
        size = end - start
        if size == 0:
            return EMPTY_ROOT
        if size & (size - 1) == 0:
            return self._levels[size.bit_length() - 1][start // size]
        k = _split(size)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """The root of the first ``size`` leaves (all of them by default)."""
        size = self.size if size is None else size
        self._check_size(size)
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of the first ``size`` leaves, leaf to root."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
        return self._path(index, 0, size)

    def _path(self, index: int, start: int, end: int) -> list[bytes]:
        if end - start == 1:
            return []
        k = _split(end - start)
        if index < start + k:
            return [*self._path(index, start, start + k), self._subtree(start + k, end)]
        return [*self._path(index, start + k, end), self._subtree(start, start + k)]

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 6962's PROOF(old_size, D[0:new_size]); empty when the sizes are equal or the old tree is empty."""
        new_size = self.size if new_size is None else new_size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"cannot prove a tree of {old_size} leaves consistent with one of {new_size}")
        if old_size in (0, new_size):
            return []
        return self._subproof(old_size, 0, new_size, True)

    def _subproof(self, m: int, start: int, end: int, whole: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if whole else [self._subtree(start, end)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, start, start + k, whole), self._subtree(start + k, end)]
        return [*self._subproof(m - k, start + k, end, False), self._subtree(start, start + k)]

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` at ``index`` in a tree of ``size`` leaves.

    Raises ProofError when the proof has the wrong length for that position, or holds a hash of the wrong size.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    if len(leaf) != HASH_SIZE or any(len(h) != HASH_SIZE for h in proof):
        raise ProofError("a hash in the proof is not 32 bytes long")
    # The path's first `inner` hashes are where index and size-1 share a subtree; past it the index is the
    # rightmost node of its level, so each remaining sibling lies to its left (RFC 9162 section 2.1.3.2).
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    if len(proof) != inner + border:
        raise ProofError(
            f"an inclusion proof of leaf {index} in {size} leaves has {inner + border} hashes, not {len(proof)}"
        )
    node = leaf
    for level, sibling in enumerate(proof[:inner]):
        node = node_hash(sibling, node) if (index >> level) & 1 else node_hash(node, sibling)
    for sibling in proof[inner:]:
        node = node_hash(sibling, node)
    return node


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ProofError unless ``proof`` shows ``leaf`` at ``index`` in the tree of ``size`` leaves with ``root``."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"the inclusion proof of leaf {index} does not lead to the root of {size} leaves")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Raise ProofError unless ``proof`` shows the tree of ``old_size`` leaves is a prefix of that of ``new_size``."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"a log cannot shrink from {old_size} to {new_size} leaves")
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        return
    if not proof or any(len(h) != HASH_SIZE for h in proof):
        raise ProofError("the consistency proof is empty or holds a hash that is not 32 bytes long")
    # RFC 9162 section 2.1.4.2: walk both roots up from the old tree's last complete subtree.
    hashes = list(proof)
    if old_size & (old_size - 1) == 0:  # the old tree is a complete subtree of the new one: its root comes first
        hashes.insert(0, old_root)
    first, second = old_size - 1, new_size - 1
    while first & 1:
        first >>= 1
        second >>= 1
    old_node = new_node = hashes[0]
    for sibling in hashes[1:]:
        if second == 0:
            raise ProofError("the consistency proof is longer than the trees need")
        if first & 1 or first == second:
            old_node = node_hash(sibling, old_node)
            new_node = node_hash(sibling, new_node)
            while first & 1 == 0 and first != 0:
                first >>= 1
                second >>= 1
        else:
            new_node = node_hash(new_node, sibling)
        first >>= 1
        second >>= 1
    if second != 0:
        raise ProofError("the consistency proof is shorter than the trees need")
    if old_node != old_root:
        raise ProofError(f"the consistency proof does not lead to the root of the {old_size}-leaf tree")
    if new_node != new_root:
        raise ProofError(f"the consistency proof does not lead to the root of the {new_size}-leaf tree")
