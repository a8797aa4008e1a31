"""Collisionless id tables: the cuckoo map, admission, expiry, eviction, row resets, lookups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.admission import CountMinSketch
from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.config import FeatureIdPolicy, IdTableConfig
from gpurec.embedding.cuckoo import EMPTY_KEY, SLOTS, CuckooTable, bucket_pair, buckets_for_rows
from gpurec.embedding.lookup import IdLookup
from gpurec.embedding.partition import STAT_NAMES, FeatureBlock, IdPartition
from gpurec.embedding.rows import initial_rows
from gpurec.embedding.tables import SparseFeatureSpec

HOUR_MS = 3_600_000


def _random_ids(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**63), 2**63 - 1, (n * 2,), dtype=torch.int64, generator=generator)
    unique = torch.unique(ids)
    return unique[torch.randperm(unique.numel(), generator=generator)][:n]


def _check_table(table: CuckooTable) -> None:
    """Structural invariants: keys and rows agree, no id twice, each id in one of its buckets."""
    stored = table.keys != EMPTY_KEY
    assert bool(((table.slot_rows >= 0) == stored).all())
    keys = table.keys[stored]
    assert keys.unique().numel() == keys.numel()
    first, second = bucket_pair(keys, table.num_buckets)
    bucket = stored.nonzero().squeeze(1) // SLOTS
    assert bool(((bucket == first) | (bucket == second)).all())


# --- the cuckoo map ---------------------------------------------------------------------------


def test_cuckoo_fills_past_ninety_percent_before_an_insert_fails():
    table = CuckooTable(num_buckets=512)
    ids = _random_ids(table.num_slots)
    placed = 0
    for start in range(0, ids.numel(), 256):
        homeless, _ = table.insert(ids[start : start + 256], torch.arange(start, start + 256))
        if homeless.numel():
            break
        placed = start + 256
    assert placed / table.num_slots >= 0.9
    _check_table(table)


def test_cuckoo_lookup_finds_every_row_and_nothing_else():
    table = CuckooTable(num_buckets=buckets_for_rows(4000))
    ids = _random_ids(5000)
    homeless, _ = table.insert(ids[:4000], torch.arange(4000))
    assert homeless.numel() == 0
    assert torch.equal(table.lookup(ids[:4000]), torch.arange(4000))
    assert bool((table.lookup(ids[4000:]) == -1).all())
    removed = table.remove(ids[:10])
    assert torch.equal(removed, torch.arange(10))
    assert bool((table.lookup(ids[:10]) == -1).all())
    _check_table(table)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buckets=st.integers(1, 6),
    batches=st.lists(st.lists(st.integers(-(2**63) + 1, 2**63 - 1), min_size=1, max_size=40), min_size=1, max_size=6),
)
def test_cuckoo_never_gives_two_ids_one_row(buckets, batches):
    """Tiny tables (1-6 buckets) overfilled by random batches: long displacement chains, homeless
    ids. Every stored id still maps to the row it was given, and homeless ids are gone."""
    table = CuckooTable(num_buckets=buckets)
    expected: dict[int, int] = {}
    next_row = 0
    for batch in batches:
        fresh = [i for i in dict.fromkeys(batch) if i not in expected]
        if not fresh:
            continue
        rows = torch.arange(next_row, next_row + len(fresh))
        next_row += len(fresh)
        homeless, homeless_rows = table.insert(torch.tensor(fresh), rows)
        expected.update(zip(fresh, rows.tolist(), strict=True))
        for key, row in zip(homeless.tolist(), homeless_rows.tolist(), strict=True):
            assert expected.pop(key) == row  # a homeless pair is returned with its own row
        _check_table(table)
        assert table.size() == len(expected)
        if expected:
            keys = torch.tensor(list(expected))
            assert table.lookup(keys).tolist() == list(expected.values())


# --- admission -------------------------------------------------------------------------------


def test_count_min_sketch_never_underestimates():
    sketch = CountMinSketch(width=64, depth=3)  # narrow: many collisions
    ids = _random_ids(500)
    truth = torch.randint(1, 5, (500,))
    for _ in range(3):
        sketch.add(ids, truth)
    assert bool((sketch.estimate(ids) >= 3 * truth).all())


class OneFeature:
    """An IdPartition holding a single feature, driven through the same calls training uses."""

    def __init__(self, capacity: int, admit_after: int = 1, expire_hours: float = 0, eviction: str = "lru") -> None:
        policy = FeatureIdPolicy(admit_after=admit_after, expire_after_hours=expire_hours, unadmitted="zero")
        self.part = IdPartition([FeatureBlock("f", policy, 0, capacity)], eviction, sketch=(1 << 14, 4))

    def assign(self, ids: torch.Tensor, times: torch.Tensor, clock_ms: int) -> torch.Tensor:
        return self.part.assign(torch.zeros_like(ids), ids, times, clock_ms)[0]

    def has_row(self, ids: torch.Tensor) -> torch.Tensor:
        return self.part.lookup(torch.zeros_like(ids), ids) >= 0

    def stat(self, name: str) -> int:
        return int(self.part.stats[0, STAT_NAMES.index(name)])


def test_an_id_gets_a_row_only_after_admit_after_occurrences():
    table = OneFeature(capacity=256, admit_after=3)
    ids = _random_ids(40)
    seen = torch.zeros(40, dtype=torch.int64)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        batch = ids[torch.randint(0, 40, (25,), generator=generator)]
        rows = table.assign(batch, torch.full_like(batch, step), clock_ms=step)
        seen += (batch[:, None] == ids[None, :]).sum(0)
        # With a wide sketch the count is exact: admitted iff seen >= 3 times so far.
        assert torch.equal(table.has_row(ids), seen >= 3)
        assert torch.equal(rows >= 0, table.has_row(batch))
    assert table.stat("admitted") == int((seen >= 3).sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(4, 40),
    admit_after=st.integers(1, 3),
    eviction=st.sampled_from(["lru", "lfu"]),
    stream=st.lists(st.lists(st.integers(0, 120), min_size=1, max_size=60), min_size=1, max_size=8),
)
def test_admitted_ids_never_share_a_row(capacity, admit_after, eviction, stream):
    """Random id streams through a small table: admissions, LRU/LFU evictions of a full table and
    expiry churn rows constantly. At every step each stored id owns exactly one row, no row has
    two ids, and the row metadata names the id the map points at."""
    table = OneFeature(capacity=capacity, admit_after=admit_after, expire_hours=1, eviction=eviction)
    vocabulary = _random_ids(121, seed=capacity)
    for step, batch in enumerate(stream):
        ids = vocabulary[torch.tensor(batch)]
        clock = step * HOUR_MS // 2
        rows = table.assign(ids, torch.full_like(ids, clock), clock_ms=clock)
        stored = table.part.row_keys[table.part.row_keys != EMPTY_KEY]
        assert stored.unique().numel() == stored.numel() == table.part.size(0) <= capacity
        own = table.part.lookup(torch.zeros_like(stored), stored)
        assert own.unique().numel() == own.numel()
        assert torch.equal(table.part.row_keys[own], stored)
        # The step's answer agrees with the map: same row for the same id, -1 only without one.
        assert torch.equal(rows, torch.where(table.has_row(ids), table.part.lookup(torch.zeros_like(ids), ids), -1))


def test_full_table_evicts_least_recently_seen_first():
    table = OneFeature(capacity=16, eviction="lru")
    ids = _random_ids(20)
    for step in range(16):  # id i last seen at time i
        table.assign(ids[step : step + 1], torch.tensor([step]), clock_ms=step)
    table.assign(ids[16:20], torch.full((4,), 100), clock_ms=100)
    assert table.has_row(ids).tolist() == [False] * 4 + [True] * 16
    assert table.stat("evicted_full") == 4


def test_full_table_evicts_least_frequently_seen_first():
    table = OneFeature(capacity=8, eviction="lfu")
    ids = _random_ids(9)
    counts = torch.tensor([5, 1, 7, 2, 9, 3, 4, 6])
    table.assign(ids[:8].repeat_interleave(counts), torch.zeros(int(counts.sum()), dtype=torch.int64), clock_ms=0)
    table.assign(ids[8:9], torch.tensor([1]), clock_ms=1)
    assert table.has_row(ids).tolist() == [True, False, True, True, True, True, True, True, True]


def test_expiry_evicts_exactly_the_stale_ids_and_frees_their_rows():
    table = OneFeature(capacity=64, expire_hours=2)
    ids = _random_ids(30)
    times = torch.arange(30) * (HOUR_MS // 10)  # id i last seen at i * 6 minutes
    table.assign(ids, times, clock_ms=int(times.max()))
    clock = 5 * HOUR_MS
    expired = table.part.expire(clock)
    stale = times < clock - 2 * HOUR_MS
    assert expired == int(stale.sum()) == table.stat("expired") > 0
    assert torch.equal(table.has_row(ids), ~stale)
    assert table.part.size(0) == int((~stale).sum())
    # Freed rows go to new ids; no row is ever held by two ids.
    newcomers = _random_ids(40, seed=9)[: int(stale.sum())]
    table.assign(newcomers, torch.full_like(newcomers, clock), clock_ms=clock)
    holders = torch.cat([ids[~stale], newcomers])
    rows = table.part.lookup(torch.zeros_like(holders), holders)
    assert bool((rows >= 0).all()) and rows.unique().numel() == rows.numel()


# --- the id map in front of the model ---------------------------------------------------------

SPECS = [SparseFeatureSpec("user_id", 64, 4), SparseFeatureSpec("hashtags", 32, 4, multi_valued=True)]


def _kjt(users: list[int], tags: list[list[int]]) -> KeyedJaggedTensor:
    values = torch.tensor(users + [t for row in tags for t in row], dtype=torch.int64)
    lengths = torch.tensor([1] * len(users) + [len(row) for row in tags], dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "hashtags"], values=values, lengths=lengths)


def test_assign_maps_admitted_ids_to_rows_and_others_to_the_default_path():
    config = IdTableConfig(admit_after=2, features={"hashtags": {"unadmitted": "zero"}})
    ids = CollisionlessIds(SPECS, config)
    batch = _kjt([10, 11, 10], [[7, 8], [7], []])
    rows, admitted = ids.assign(batch, torch.tensor([0, 1, 2]))
    user_rows = rows["user_id"].values()
    # user 10 (seen twice) earned a row, user 11 reads the shared default row 0.
    assert user_rows[0] == user_rows[2] != 0 and user_rows[1] == 0
    # hashtag 7 earned a row; 8 is dropped from its bag (zero vector), not mapped to row 0.
    assert rows["hashtags"].lengths().tolist() == [1, 1, 0]
    assert rows["hashtags"].values()[0] == rows["hashtags"].values()[1] >= 0
    assert set(admitted) == {"user_id", "hashtags"}
    assert admitted["user_id"].rows.tolist() == [int(user_rows[0])]

    lookup = IdLookup.from_partitions([ids.partition])
    served = torch.jit.script(lookup)(_kjt([10, 11, 99], [[7, 8], [8], [7]]))
    assert served["user_id"].values().tolist() == [int(user_rows[0]), 0, 0]
    assert served["hashtags"].lengths().tolist() == [1, 0, 1]


def test_partitions_own_disjoint_row_blocks_and_lookup_reads_all_of_them():
    config = IdTableConfig(admit_after=1)
    maps = [CollisionlessIds(SPECS, config, rank=p, world_size=2) for p in range(2)]
    users = _random_ids(40, seed=3)
    from gpurec.embedding.cuckoo import owner_of

    owner = owner_of(users, 2)
    expected = {}
    for p, id_map in enumerate(maps):
        mine = users[owner == p]
        rows, _ = id_map.partition.assign(torch.zeros_like(mine), mine, torch.zeros_like(mine), clock_ms=0)
        low, high = (1, 32) if p == 0 else (32, 64)  # row 0 is partition 0's default row
        assert bool(((rows >= low) & (rows < high)).all())
        expected.update(zip(mine.tolist(), rows.tolist(), strict=True))
    lookup = IdLookup.from_partitions([m.partition for m in maps])
    got = lookup.rows_of(torch.zeros_like(users), users)
    assert got.tolist() == [expected[u] for u in users.tolist()]


def test_initial_rows_depend_only_on_feature_and_id():
    ids = _random_ids(100)
    first = initial_rows(ids, "user_id", 16, 1000)
    assert torch.equal(first[10:20], initial_rows(ids[10:20], "user_id", 16, 1000))
    assert not torch.equal(first, initial_rows(ids, "item_id", 16, 1000))
    bound = (1 / 1000) ** 0.5
    assert float(first.abs().max()) <= bound and float(first.std()) > bound / 3


def test_config_rejects_typos_and_bad_values():
    with pytest.raises(ValueError, match="admit_afer"):
        IdTableConfig.from_value({"admit_afer": 2})
    with pytest.raises(ValueError, match="eviction"):
        IdTableConfig(eviction="fifo")
    with pytest.raises(ValueError, match=r"ids\.features\.user_id"):
        IdTableConfig(features={"user_id": {"admit_after": 0}})
    with pytest.raises(ValueError, match="unknown features"):
        CollisionlessIds(SPECS, IdTableConfig(features={"usr_id": {"admit_after": 3}}))
