"""RFC 6962 hashing and proofs (sightline.audit_merkle) against the published test vectors.

The vectors are the RFC 6962 test data of transparency-dev/merkle (testonly/constants.go and
proof/verify_test.go): eight leaf inputs, the roots of the trees of their first 1 to 8 leaves, and
inclusion and consistency proofs among them. They are written out here as expected values.
"""

from __future__ import annotations

import hashlib

import pytest
from sightline.audit_merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                     "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# Leaf hashes (level 0) and complete-subtree hashes of the 8-leaf tree.
LEAF_HASHES = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
]
# (leaf index, tree size, proof): the vectors' 1-based leaf numbers made 0-based.
INCLUSION = [
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")

TREE = MerkleTree([leaf_hash(leaf) for leaf in LEAVES])


def test_leaf_and_node_hashes_are_rfc6962s() -> None:
    assert [leaf_hash(leaf).hex() for leaf in LEAVES] == LEAF_HASHES
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()


@pytest.mark.parametrize("size", range(9))
def test_roots_of_trees_of_0_to_8_leaves(size: int) -> None:
    assert TREE.root(size).hex() == ROOTS[size]
    assert MerkleTree([leaf_hash(leaf) for leaf in LEAVES[:size]]).root().hex() == ROOTS[size]
    assert EMPTY_ROOT.hex() == ROOTS[0]


def test_a_tree_grown_leaf_by_leaf_has_every_intermediate_root() -> None:
    grown = MerkleTree([])
    for size, leaf in enumerate(LEAVES, start=1):
        grown.extend([leaf_hash(leaf)])
        assert grown.root().hex() == ROOTS[size]


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_vectors(index: int, size: int, proof: list[str]) -> None:
    expected = [bytes.fromhex(h) for h in proof]
    assert TREE.inclusion_proof(index, size) == expected
    root = bytes.fromhex(ROOTS[size])
    leaf = leaf_hash(LEAVES[index])
    assert root_from_inclusion_proof(index, size, leaf, expected) == root
    verify_inclusion(index, size, leaf, expected, root)
    for wrong in _corrupt_inclusion(index, size, leaf, expected, root):
        with pytest.raises(ProofError):
            verify_inclusion(*wrong)


def _corrupt_inclusion(
    index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes
) -> list[tuple[int, int, bytes, list[bytes], bytes]]:
    probes = [
        (index + 1, size, leaf, proof, root),
        (index ^ 2, size, leaf, proof, root),
        (index, size * 2, leaf, proof, root),
        (index, size, SOME_HASH, proof, root),
        (index, size, leaf, proof, EMPTY_ROOT),
        (index, size, leaf, proof, SOME_HASH),
        (index, size, leaf, [*proof, root], root),
        (index, size, leaf, [root, *proof], root),
    ]
    if index > 0:
        probes.append((index - 1, size, leaf, proof, root))
    if size > 1:
        probes.append((index, size // 2, leaf, proof, root))
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        probes.append((index, size, leaf, flipped, root))
    if proof:
        probes.append((index, size, leaf, proof[:-1], root))
    return probes


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_vectors(old: int, new: int, proof: list[str]) -> None:
    expected = [bytes.fromhex(h) for h in proof]
    assert TREE.consistency_proof(old, new) == expected
    old_root, new_root = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    verify_consistency(old, new, old_root, new_root, expected)
    if not expected:
        return
    probes = [
        (old, new, new_root, old_root, expected),  # swapped roots
        (old, new, SOME_HASH, new_root, expected),
        (old, new, old_root, SOME_HASH, expected),
        (old, new, old_root, new_root, []),
        (old, new, old_root, new_root, expected[:-1]),
        (old, new, old_root, new_root, [*expected, old_root]),
        (old, new, old_root, new_root, [expected[0], *expected]),
        (old - 1, new, old_root, new_root, expected),
        (old + 1, new, old_root, new_root, expected),
        (old, new * 2, old_root, new_root, expected),
    ]
    for i in range(len(expected)):
        flipped = [*expected]
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        probes.append((old, new, old_root, new_root, flipped))
    for wrong in probes:
        with pytest.raises(ProofError):
            verify_consistency(*wrong)


def test_consistency_from_every_size_to_every_larger_size() -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(70)]
    tree = MerkleTree(leaves)
    roots = [tree.root(size) for size in range(len(leaves) + 1)]
    for new in range(len(leaves) + 1):
        for old in range(new + 1):
            verify_consistency(old, new, roots[old], roots[new], tree.consistency_proof(old, new))
        for index in range(new):
            verify_inclusion(index, new, leaves[index], tree.inclusion_proof(index, new), roots[new])


def test_a_rewritten_history_is_inconsistent() -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(20)]
    forked = [*leaves[:9], leaf_hash(b"rewritten"), *leaves[10:]]
    honest, rewritten = MerkleTree(leaves), MerkleTree(forked)
    for old in range(10, 21):
        with pytest.raises(ProofError):
            verify_consistency(old, 20, honest.root(old), rewritten.root(20), rewritten.consistency_proof(old, 20))


def test_proofs_for_positions_outside_the_tree_are_refused() -> None:
    with pytest.raises(ProofError):
        verify_inclusion(0, 0, SOME_HASH, [], EMPTY_ROOT)
    with pytest.raises(ProofError):
        verify_inclusion(2, 1, SOME_HASH, [], SOME_HASH)
    with pytest.raises(ProofError):
        verify_consistency(2, 1, SOME_HASH, SOME_HASH, [])
    with pytest.raises(ValueError, match="outside"):
        TREE.inclusion_proof(8, 8)
