"""Block keys are content addresses; the block pool refcounts, shares and evicts LRU."""

from __future__ import annotations

import pytest

from serve.kv_cache import BlockPool
from serve.prefix_cache import ImageSpan, block_keys, image_digest

TOKENS = list(range(100, 164))  # 4 blocks of 16


def test_changing_any_token_changes_its_block_key_and_all_later_ones():
    base = block_keys(TOKENS, 16)
    assert len(base) == 4 and len(set(base)) == 4
    for i in (0, 17, 40, 63):
        changed = list(TOKENS)
        changed[i] += 1
        keys = block_keys(changed, 16)
        b = i // 16
        assert keys[:b] == base[:b]
        assert all(k != o for k, o in zip(keys[b:], base[b:], strict=True))


def test_image_bytes_and_tenant_salt_change_keys():
    png = bytes(range(256)) * 4
    span = ImageSpan(20, 36, image_digest(png))  # covers blocks 1 and 2
    with_image = block_keys(TOKENS, 16, images=[span])
    flipped = bytearray(png)
    flipped[100] ^= 1
    other = block_keys(TOKENS, 16, images=[ImageSpan(20, 36, image_digest(bytes(flipped)))])
    plain = block_keys(TOKENS, 16)
    assert with_image[0] == other[0] == plain[0]  # block 0 covers no image
    assert with_image[1] != other[1] and with_image[1] != plain[1]
    assert with_image[3] != other[3]  # chained: later blocks differ too
    assert block_keys(TOKENS, 16, salt="a") != block_keys(TOKENS, 16, salt="b")
    # Resuming the chain from a parent gives the same keys as hashing from the start.
    assert block_keys(TOKENS, 16, parent=plain[1], first_block=2) == plain[2:]


def test_refcounts_sharing_and_lru_eviction():
    pool = BlockPool(num_blocks=4, block_size=16)
    keys = block_keys(TOKENS, 16)
    a = [pool.allocate() for _ in range(2)]
    for b, k in zip(a, keys, strict=False):
        assert pool.register(b, k)
    assert not pool.register(pool.allocate(), keys[0])  # same content already cached
    assert pool.lookup(keys) == a  # longest cached prefix
    pool.acquire(a)  # a second sequence shares both blocks
    pool.release(a)
    assert pool.num_available() == 1  # still used by the first sequence
    pool.release(a)
    assert pool.num_available() == 3 and pool.num_cached() == 2  # cached, evictable
    # Fresh allocations use free blocks first, then evict the chain's tail before its head.
    pool.allocate()
    assert pool.lookup(keys) == a
    pool.allocate()
    assert pool.lookup(keys) == a[:1]
    pool.allocate()
    assert pool.lookup(keys) == [] and pool.num_available() == 0
    with pytest.raises(MemoryError):
        pool.allocate()


def test_a_reused_cached_block_is_never_handed_out_while_in_use():
    pool = BlockPool(num_blocks=3, block_size=16)
    key = block_keys(TOKENS, 16)[0]
    a = pool.allocate()
    assert pool.register(a, key)
    pool.release([a])  # cached and evictable
    assert pool.lookup([key]) == [a]
    pool.acquire([a])  # a new sequence reuses it: no longer evictable
    assert pool.num_available() == 2
    fresh = [pool.allocate(), pool.allocate()]
    assert a not in fresh
    with pytest.raises(MemoryError):
        pool.allocate()
    pool.release([a])  # its user finishes: cached again, still under its key
    assert pool.lookup([key]) == [a] and pool.num_available() == 1


def test_an_image_enters_exactly_the_blocks_it_overlaps():
    """An image spanning [16, 32) — block 1 exactly — changes block 1's key, not block 0's,
    and block 2's key is the plain chain from block 1 (the image ends where block 2 starts)."""
    digest = image_digest(b"pixels")
    keys = block_keys(TOKENS, 16, images=[ImageSpan(16, 32, digest)])
    plain = block_keys(TOKENS, 16)
    assert keys[0] == plain[0] and keys[1] != plain[1]
    assert keys[2:] == block_keys(TOKENS, 16, parent=keys[1], first_block=2)
    # one token into block 2 is enough to make the image part of its key
    longer = block_keys(TOKENS, 16, images=[ImageSpan(16, 33, digest)])
    assert longer[:2] == keys[:2] and longer[2] != keys[2]


def test_only_full_blocks_get_keys_and_a_resumed_chain_matches():
    assert len(block_keys(TOKENS[:47], 16)) == 2 and len(block_keys(TOKENS[:48], 16)) == 3
    assert block_keys(TOKENS[:15], 16) == []
    full = block_keys(TOKENS, 8)
    assert len(full) == 8 and block_keys(TOKENS[:24], 8) == full[:3]
    assert block_keys(TOKENS, 8, parent=full[4], first_block=5) == full[5:]


def test_the_default_salt_is_the_empty_tenant():
    """Callers that pass no salt share keys with the engine's default (salt ""); any named
    tenant, whatever its name, gets keys of its own."""
    assert block_keys(TOKENS, 16) == block_keys(TOKENS, 16, salt="")
    for name in ("XXXX", "root", " "):
        assert block_keys(TOKENS, 16, salt=name)[0] != block_keys(TOKENS, 16)[0]
