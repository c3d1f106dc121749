"""cache.store.ReferenceStore: search vs a brute-force oracle, LRU eviction, bounds over 10,000 inserts, threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cache.store import ReferenceStore


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_matches_brute_force_through_adds_evictions_and_refreshes() -> None:
    rng = np.random.default_rng(0)
    store: ReferenceStore[str] = ReferenceStore(dim=16, max_refs=5)
    live: dict[int, np.ndarray] = {}  # the oracle: id -> signature of what the store should hold
    order: list[int] = []  # least recently used first
    for step in range(300):
        sig = _unit(rng, 1, 16)[0]
        op = rng.integers(0, 4)
        if op == 0 or not live:
            ref_id, evicted = store.add(sig, f"p{step}", nbytes=10)
            want_evicted = order[: max(0, len(order) + 1 - 5)]
            assert evicted == want_evicted
            for e in evicted:
                live.pop(e)
                order.remove(e)
            live[ref_id] = sig
            order.append(ref_id)
        elif op == 1:
            victim = order[int(rng.integers(0, len(order)))]
            store.replace(victim, sig, f"r{step}", nbytes=10)
            live[victim] = sig
            order.remove(victim)
            order.append(victim)
        elif op == 2:
            used = order[int(rng.integers(0, len(order)))]
            store.touch(used)
            order.remove(used)
            order.append(used)
        query = _unit(rng, 1, 16)[0]
        ids = list(live)
        scores = np.stack([live[i] for i in ids]) @ query
        want = sorted(zip(ids, scores.tolist()), key=lambda t: -t[1])[:3]
        got = store.search(query, k=3)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-5)
        assert store.ids() == order and store.index_size == len(live)
    exclude = {order[-1], order[0]}
    got = store.search(live[order[-1]], k=10, exclude=exclude)
    assert len(got) == len(live) - 2 and not exclude & {i for i, _ in got}


def test_bounded_over_10000_signatures() -> None:
    rng = np.random.default_rng(1)
    dim, cap, payload = 64, 8, 1000
    store: ReferenceStore[int] = ReferenceStore(dim=dim, max_refs=cap)
    bound = cap * (payload + ReferenceStore.entry_overhead(dim))
    sigs = _unit(rng, 10_000, dim)
    evicted_total = 0
    for i, sig in enumerate(sigs):
        if i % 50 == 0:  # FAISS's OpenMP search costs ms each on a busy CPU: search a sample
            best = store.search(sig, k=1)
            assert not best or best[0][1] < 0.7  # random 64-d unit vectors are never near
        _, evicted = store.add(sig, i, nbytes=payload)
        evicted_total += len(evicted)
        assert len(store) <= cap and store.index_size == len(store)
        assert store.memory_bytes() <= bound
    assert evicted_total == 10_000 - cap
    assert store.ids() == list(range(10_000 - cap, 10_000))
    assert store.memory_bytes() == bound
    # the last stored signature finds itself
    ref_id, score = store.search(sigs[-1], k=1)[0]
    assert ref_id == 9_999 and score == pytest.approx(1.0, abs=1e-5)


def test_uses_hits_and_refresh_bookkeeping() -> None:
    store: ReferenceStore[str] = ReferenceStore(dim=4, max_refs=2)
    sig = np.array([1, 0, 0, 0], dtype=np.float32)
    a, _ = store.add(sig, "a", nbytes=1, uses=2)
    assert (store.get(a).uses, store.get(a).hits) == (2, 2)
    store.touch(a)
    assert (store.get(a).uses, store.get(a).hits) == (3, 3)
    store.replace(a, np.array([0, 1, 0, 0], dtype=np.float32), "a2", nbytes=1)
    ref = store.get(a)
    assert (ref.payload, ref.uses, ref.hits) == ("a2", 0, 3)
    assert store.search(np.array([0, 1, 0, 0], dtype=np.float32))[0][0] == a
    store.remove(a)
    assert len(store) == 0 and store.index_size == 0 and store.search(sig) == []
    with pytest.raises(KeyError, match="reference 0 is not in the store"):
        store.get(a)
    with pytest.raises(KeyError, match="cannot refresh reference 0"):
        store.replace(a, sig, "x", nbytes=1)


def test_rejects_bad_shapes_with_the_fix() -> None:
    store: ReferenceStore[str] = ReferenceStore(dim=4, max_refs=2)
    with pytest.raises(ValueError, match="signature has 3 values but this store holds 4-long.*reset the cacher"):
        store.add(np.ones(3, dtype=np.float32), "x", nbytes=1)
    with pytest.raises(ValueError, match="max_refs >= 1"):
        ReferenceStore(dim=4, max_refs=0)


def test_concurrent_writers_keep_index_and_entries_consistent() -> None:
    store: ReferenceStore[int] = ReferenceStore(dim=32, max_refs=6)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in range(300):
                sig = _unit(rng, 1, 32)[0]
                hits = store.search(sig, k=2)
                if hits and i % 3 == 0:
                    try:
                        store.replace(hits[0][0], sig, i, nbytes=8)
                    except KeyError:  # evicted by another writer in between: allowed
                        pass
                else:
                    store.add(sig, i, nbytes=8)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store) == store.index_size <= 6
    held = set(store.ids())
    for ref_id in held:  # every held entry is findable by its own signature
        assert store.search(store.get(ref_id).signature, k=1)[0][0] == ref_id
