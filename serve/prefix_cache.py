"""Content-addressed keys for full KV blocks.

A block's key is a hash chained from its parent block's key, its token ids, the hashes of the
images whose placeholder tokens it covers, and (through the root) a per-tenant salt. Equal
keys mean equal KV contents, so a cache lookup needs no invalidation step: change any token,
image byte or tenant and every key from that block on changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSpan:
    """Placeholder tokens [start, end) of one image in the prompt, with the image's hash."""

    start: int
    end: int
    digest: bytes


def image_digest(data: bytes) -> bytes:
    """Hash of an image's encoded bytes (what a block key includes)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def root_key(salt: str) -> bytes:
    """The parent key of a sequence's first block; differs per tenant salt."""
    return hashlib.blake2b(b"root\0" + salt.encode(), digest_size=16).digest()


def block_key(parent: bytes, token_ids: Sequence[int], images: Sequence[bytes] = ()) -> bytes:
    """Key of one full block: hash(parent key, its token ids, hashes of images it covers)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    for digest in images:
        h.update(b"img\0" + digest)
    return h.digest()


def block_keys(
    token_ids: Sequence[int],
    block_size: int,
    salt: str = "",
    images: Sequence[ImageSpan] = (),
    parent: bytes | None = None,
    first_block: int = 0,
) -> list[bytes]:
    """Chained keys of every full block of `token_ids`, starting at block `first_block`.

    `parent` is the key of block `first_block - 1` (the salt's root key when starting at 0).
    """
    key = root_key(salt) if parent is None else parent
    keys = []
    for b in range(first_block, len(token_ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        covered = [im.digest for im in images if im.start < hi and im.end > lo]
        key = block_key(key, token_ids[lo:hi], covered)
        keys.append(key)
    return keys
