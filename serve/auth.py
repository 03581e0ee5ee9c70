"""Bearer API keys, stored as hashes, each with an optional budget in USD.

The keys file (`keys=<path>`) holds one JSON object a line; blank lines and `#` comments
are skipped:

    {"name": "alice", "key_sha256": "9f86d0…", "budget_usd": 5.0}
    {"name": "ci", "key_sha256": "60303a…"}                # no budget: unlimited

Write a line with `key_line(name, key, budget_usd)`; `new_key()` makes a random key. The
server never stores a key, only its SHA-256; a presented key is hashed and compared with
every stored hash in constant time. A key's remaining budget is its budget minus what the
usage ledger says it has spent.

A `KeyStore` is the API's auth hook (serve/api/hooks.py); `for_server(model, args)` loads
it from `keys=<path>` for `python -m distill serve`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AuthError(Exception):
    """A missing or unknown key → 401 (fields mirror an OpenAI error object)."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class QuotaError(Exception):
    """A request the key's remaining budget cannot cover → 429 insufficient_quota."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"

    def __init__(self, message: str, remaining_usd: float):
        super().__init__(message)
        self.message, self.remaining_usd = message, remaining_usd


class SpendSource(Protocol):
    def spent_usd(self, key_id: str) -> float: ...


@dataclass(frozen=True)
class Principal:
    """Who is calling: `name` keys the ledger, `cache_salt` separates prefix caches."""

    name: str
    budget_usd: float | None = None  # None = unlimited
    cache_salt: str = ""


ANONYMOUS = Principal("anonymous")  # the caller when no keys file is configured


def hash_key(key: str) -> str:
    """The hex SHA-256 a keys file stores for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(prefix: str = "sk-nd-") -> str:
    """A fresh random API key (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def key_line(name: str, key: str, budget_usd: float | None = None) -> str:
    """One keys-file line for `key` (the key itself is not in it)."""
    entry: dict = {"name": name, "key_sha256": hash_key(key)}
    if budget_usd is not None:
        entry["budget_usd"] = budget_usd
    return json.dumps(entry)


def cache_salt(key_sha256: str) -> str:
    """A stable per-key salt for prefix-cache keys, derived from (not equal to) the stored
    hash, so it reveals neither the key nor the hash."""
    return hashlib.sha256(b"nanodistill-cache-salt\0" + bytes.fromhex(key_sha256)).hexdigest()[:32]


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class KeyStore:
    """The keys of one keys file."""

    def __init__(self, entries: list[_Entry]):
        if not entries:
            raise ValueError("a keys file needs at least one key")
        self._entries = entries

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """Read and validate a keys file (errors name the file and line)."""
        path = Path(path)
        entries, names, digests = [], set(), set()
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object: {e}") from e
            entry = _parse_entry(item, where)
            if entry.principal.name in names:
                raise ValueError(f"{where}: duplicate name {entry.principal.name!r}")
            if entry.digest in digests:
                raise ValueError(f"{where}: the same key is listed twice")
            names.add(entry.principal.name)
            digests.add(entry.digest)
            entries.append(entry)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def principal(self, name: str) -> Principal | None:
        """The principal named `name` (a batch resumed after a restart runs as its owner)."""
        return next((e.principal for e in self._entries if e.principal.name == name), None)

    def authenticate(self, authorization) -> Principal:
        """The principal for an `Authorization: Bearer <key>` header value, or for a request
        object carrying `.headers` (the API's auth hook); AuthError otherwise."""
        headers = getattr(authorization, "headers", None)
        if headers is not None:
            authorization = headers.get("authorization")
        if not authorization:
            raise AuthError("missing API key: send it as 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError("the Authorization header must be 'Bearer <key>'")
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for entry in self._entries:  # compare with every entry: timing says nothing
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        if found is None:
            raise AuthError("incorrect API key provided")
        return found


def _parse_entry(item, where: str) -> _Entry:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    unknown = set(item) - {"name", "key_sha256", "budget_usd"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    name, digest, budget = item.get("name"), item.get("key_sha256"), item.get("budget_usd")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: name must be 1-64 of A-Z a-z 0-9 _ . @ -")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError(f"{where}: key_sha256 must be 64 lowercase hex digits (hash_key(key))")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0
    ):
        raise ValueError(f"{where}: budget_usd must be a number >= 0 or absent")
    principal = Principal(name, None if budget is None else float(budget), cache_salt(digest))
    return _Entry(bytes.fromhex(digest), principal)


def authenticate(authorization: str | None, keys: KeyStore | None) -> Principal:
    """The caller: ANONYMOUS when no keys are configured, else the key's principal."""
    return ANONYMOUS if keys is None else keys.authenticate(authorization)


def remaining_budget(principal: Principal, ledger: SpendSource) -> float | None:
    """Budget minus ledger spend (never below 0); None for an unlimited key."""
    if principal.budget_usd is None:
        return None
    return max(0.0, principal.budget_usd - ledger.spent_usd(principal.name))


def check_budget(principal: Principal, worst_case_usd: float, ledger: SpendSource) -> float | None:
    """Refuse (QuotaError → 429 insufficient_quota) a request whose worst-case cost exceeds
    the key's remaining budget; returns the remaining budget (None = unlimited)."""
    remaining = remaining_budget(principal, ledger)
    if remaining is not None and worst_case_usd > remaining:
        raise QuotaError(
            f"insufficient quota: this request may cost up to ${worst_case_usd:.6f} but key "
            f"{principal.name!r} has ${remaining:.6f} of its ${principal.budget_usd:.2f} budget "
            "left; lower max_tokens or raise the budget",
            remaining,
        )
    return remaining


def for_server(model, args: dict[str, str]) -> KeyStore | None:
    """The auth hook for `python -m distill serve`: the keys file `keys=`, or None (open)."""
    path = args.get("keys")
    return KeyStore.load(Path(path).expanduser()) if path else None
