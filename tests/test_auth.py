"""API keys, budgets and cache salts (serve/auth.py) with the real SQLite ledger."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serve.auth import (
    ANONYMOUS,
    AuthError,
    KeyStore,
    QuotaError,
    authenticate,
    cache_salt,
    check_budget,
    for_server,
    hash_key,
    key_line,
    new_key,
    remaining_budget,
)
from serve.billing import PriceList, Usage, UsageLedger
from serve.export_format import Pricing


@pytest.fixture
def keys(tmp_path):
    alice, bob = new_key(), new_key()
    path = tmp_path / "keys.jsonl"
    path.write_text(
        "# name, hash of the key, optional budget\n"
        + key_line("alice", alice, budget_usd=0.01)
        + "\n\n"
        + key_line("bob", bob)
        + "\n"
    )
    return KeyStore.load(path), alice, bob, path


def test_keys_file_holds_hashes_not_keys(keys):
    store, alice, bob, path = keys
    text = path.read_text()
    assert alice not in text and bob not in text and hash_key(alice) in text
    assert len(store) == 2 and new_key() != new_key()


def test_authenticate(keys):
    store, alice, bob, _ = keys
    a = store.authenticate(f"Bearer {alice}")
    assert (a.name, a.budget_usd) == ("alice", 0.01)
    b = authenticate(f"bearer  {bob} ", store)
    assert (b.name, b.budget_usd) == ("bob", None)
    for header in (None, "", "Bearer", f"Basic {alice}", f"Bearer {alice}x", "Bearer sk-nd-nope"):
        with pytest.raises(AuthError) as e:
            store.authenticate(header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    assert authenticate(None, None) is ANONYMOUS


def test_cache_salt_is_per_key_stable_and_not_the_key(keys):
    store, alice, bob, path = keys
    a, b = store.authenticate(f"Bearer {alice}"), store.authenticate(f"Bearer {bob}")
    assert a.cache_salt and a.cache_salt != b.cache_salt
    assert KeyStore.load(path).authenticate(f"Bearer {alice}").cache_salt == a.cache_salt
    assert a.cache_salt == cache_salt(hash_key(alice))
    assert alice not in a.cache_salt and a.cache_salt not in hash_key(alice)


def test_budget_is_budget_minus_ledger_spend(keys, tmp_path):
    store, alice, bob, _ = keys
    a, b = store.authenticate(f"Bearer {alice}"), store.authenticate(f"Bearer {bob}")
    prices = PriceList(Pricing(input_per_1m=10.0, output_per_1m=40.0))
    with UsageLedger(tmp_path / "usage.sqlite") as ledger:
        assert remaining_budget(a, ledger) == pytest.approx(0.01)
        assert check_budget(a, prices.worst_case(100, 200), ledger) == pytest.approx(0.01)
        usage = Usage(100, 200)
        ledger.record("alice", "nano", usage, prices.cost(usage)["total"])  # $0.009 spent
        assert remaining_budget(a, ledger) == pytest.approx(0.001)
        with pytest.raises(QuotaError) as e:
            check_budget(a, prices.worst_case(100, 200), ledger)
        assert e.value.status == 429 and e.value.code == "insufficient_quota"
        assert "alice" in e.value.message and e.value.remaining_usd == pytest.approx(0.001)
        check_budget(a, prices.worst_case(10, 20), ledger)  # $0.0009 still fits
        ledger.record("bob", "nano", Usage(10**6, 10**6), 50.0)
        assert check_budget(b, 1e9, ledger) is None  # no budget: unlimited
        ledger.record("alice", "nano", usage, 1.0)
        assert remaining_budget(a, ledger) == 0.0  # overspent (a stream ran on) reads as 0


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not a JSON object"),
        ('["a"]', "must be a JSON object"),
        ('{"name": "a", "key_sha256": "abc"}', "64 lowercase hex"),
        ('{"name": "a b", "key_sha256": "' + "0" * 64 + '"}', "name must be"),
        ('{"name": "a", "key_sha256": "' + "0" * 64 + '", "budget_usd": -1}', "budget_usd"),
        ('{"name": "a", "key_sha256": "' + "0" * 64 + '", "budget_usd": "5"}', "budget_usd"),
        ('{"name": "a", "key": "sk-plain"}', "unknown fields"),
    ],
)
def test_bad_keys_files_name_the_line(tmp_path, line, problem):
    path = tmp_path / "keys.jsonl"
    path.write_text("# keys\n" + line + "\n")
    with pytest.raises(ValueError, match=problem) as e:
        KeyStore.load(path)
    assert f"{path}:2" in str(e.value)


def test_duplicates_and_empty_files_are_refused(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text(key_line("a", "k1") + "\n" + key_line("a", "k2") + "\n")
    with pytest.raises(ValueError, match="duplicate name"):
        KeyStore.load(path)
    path.write_text(key_line("a", "k1") + "\n" + key_line("b", "k1") + "\n")
    with pytest.raises(ValueError, match="listed twice"):
        KeyStore.load(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="at least one key"):
        KeyStore.load(path)


def test_for_server(keys):
    store, alice, _, path = keys
    assert for_server(None, {}) is None  # no keys file: an open server
    hook = for_server(None, {"keys": str(path)})
    request = SimpleNamespace(headers={"authorization": f"Bearer {alice}"})  # header lookup
    assert hook.authenticate(request).name == "alice"
