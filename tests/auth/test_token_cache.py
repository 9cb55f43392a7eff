"""Verified tokens are remembered by a hash of the whole token, until they expire, in bounded memory."""

from __future__ import annotations

from extproc.auth.identity import Identity
from extproc.auth.token_cache import VerifiedTokens, token_digest


def ident(name: str, exp: float) -> Identity:
    return Identity(name, None, None, "iss", None, exp)


def test_a_verified_token_is_found_again_until_its_exp():
    cache = VerifiedTokens(10)
    d = token_digest("header.payload.sig")
    cache.put(d, ident("alice", 100.0), now=50.0)
    assert cache.get(d, now=99.9).principal == "alice"
    assert cache.get(d, now=100.0) is None
    assert len(cache) == 0  # evicted at exp


def test_tokens_that_share_a_long_prefix_never_share_an_entry():
    cache = VerifiedTokens(10)
    a, b = "eyJhbGciOi." + "x" * 500 + ".sigA", "eyJhbGciOi." + "x" * 500 + ".sigB"
    cache.put(token_digest(a), ident("alice", 100.0), now=0.0)
    assert cache.get(token_digest(b), now=1.0) is None


def test_the_cache_is_bounded_dropping_expired_entries_then_the_oldest():
    cache = VerifiedTokens(3)
    cache.put(b"old", ident("old", 10.0), now=0.0)
    cache.put(b"a", ident("a", 100.0), now=0.0)
    cache.put(b"b", ident("b", 100.0), now=0.0)
    cache.put(b"c", ident("c", 100.0), now=20.0)  # "old" has expired: it goes first
    assert {cache.get(k, 21.0).principal for k in (b"a", b"b", b"c")} == {"a", "b", "c"}
    cache.put(b"d", ident("d", 100.0), now=21.0)  # full of live entries: the oldest goes
    assert cache.get(b"a", 22.0) is None and cache.get(b"d", 22.0).principal == "d"
    assert len(cache) == 3


def test_an_already_expired_token_is_not_stored_and_a_zero_capacity_stores_nothing():
    cache = VerifiedTokens(3)
    cache.put(b"x", ident("x", 5.0), now=6.0)
    assert len(cache) == 0
    off = VerifiedTokens(0)
    off.put(b"y", ident("y", 100.0), now=0.0)
    assert len(off) == 0
