"""Fixed-size KV blocks: allocation, refcounts, the content-addressed map and LRU eviction.

The tensors live in `serve.llama.KVPool` (slot = block * block_size + offset); this class only
decides which block ids a sequence owns. A full block may carry a key (see
`serve.prefix_cache`); keyed blocks stay cached after their last user releases them and are
evicted least-recently-released first, only when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # never cached, or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused, oldest first

    def num_available(self) -> int:
        """Blocks a new allocation can get (free + cached-but-unused)."""
        return len(self.free) + len(self.evictable)

    def num_cached(self) -> int:
        return len(self.by_key)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Block ids of the longest prefix of `keys` that is cached (no refcount change)."""
        hits = []
        for key in keys:
            block = self.by_key.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def acquire(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks a new sequence reuses."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1

    def allocate(self) -> int:
        """A fresh block with refcount 1; evicts the least recently used cached block if needed."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise MemoryError(
                "KV cache is out of blocks (the scheduler's reservation was violated)"
            )
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unused keyed blocks become evictable.

        Released tail-first, so a chain's last blocks are evicted before its first: a prefix
        lookup stops at the first miss, and a kept tail behind an evicted head would be dead.
        """
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.key_of[b] is None:
                    self.free.append(b)
                else:
                    self.evictable[b] = None

    def register(self, block: int, key: bytes) -> bool:
        """Publish a full block under `key`; False if that content is already cached elsewhere."""
        if key in self.by_key or self.key_of[block] is not None:
            return False
        self.by_key[key] = block
        self.key_of[block] = key
        return True
