"""The Triton cuckoo kernels (kernels/cuckoo.py) against the torch reference, under Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when kernels.cuckoo is imported: it is set
before that import and restored right after, so it does not leak into other test modules. When
kernels.cuckoo was already imported without it (by another test), a private interpreted copy of the
module is loaded from its file instead, and the dispatch test swaps it into sys.modules.

The interpreter runs one program at a time: it checks the kernels' logic, hash, masking and the
contention between lanes of one program, not concurrency between CTAs (see kernels/README.md). The
AOT test compiles every kernel for sm_80 and sm_90 with the real compiler.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before kernels.cuckoo (and, if not yet imported, triton)

import pytest  # noqa: E402
import torch  # noqa: E402

from gpurec.embedding.config import FeatureIdPolicy  # noqa: E402
from gpurec.embedding.cuckoo import EMPTY_KEY, SLOTS, CuckooTable, bucket_pair  # noqa: E402
from gpurec.embedding.partition import STAT_NAMES, FeatureBlock, IdPartition  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _interpreted_kernels():
    """kernels.cuckoo with interpreted kernels: the module itself, or a private copy of it."""
    module = importlib.import_module("kernels.cuckoo")
    if module.interpreted():
        return module
    spec = importlib.util.spec_from_file_location("_kernels_cuckoo_interpreted", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.interpreted(), "TRITON_INTERPRET=1 did not give interpreted kernels"
    return copy


try:
    kc = _interpreted_kernels()
finally:
    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

# Every kernel in KERNELS must be covered by the tests below (and by compile_all).
KERNEL_NAMES = {"cuckoo_lookup", "cuckoo_lookup_segmented", "cuckoo_insert", "cuckoo_bucket_pair"}


# --- helpers ----------------------------------------------------------------------------------


def random_ids(n: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` distinct int64 ids over the whole range, none equal to EMPTY_KEY or in ``exclude``."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(-(2**63), 2**63 - 1, (2 * n + 16,), generator=gen, dtype=torch.int64)
    pool = torch.unique(pool)
    pool = pool[pool != EMPTY_KEY]
    if exclude is not None and exclude.numel():
        pool = pool[~torch.isin(pool, exclude)]
    pool = pool[torch.randperm(pool.numel(), generator=gen)]
    assert pool.numel() >= n
    return pool[:n]


def reference_table(num_buckets: int, ids: torch.Tensor, rows: torch.Tensor) -> CuckooTable:
    table = CuckooTable(num_buckets, backend="torch")
    homeless, _ = table.insert(ids, rows)
    assert homeless.numel() == 0
    return table


def clone_table(table: CuckooTable, backend: str = "torch") -> CuckooTable:
    copy = CuckooTable(table.num_buckets, backend=backend)
    copy.keys.copy_(table.keys)
    copy.slot_rows.copy_(table.slot_rows)
    return copy


def stored_pairs(table: CuckooTable) -> dict[int, int]:
    used = table.keys != EMPTY_KEY
    return dict(zip(table.keys[used].tolist(), table.slot_rows[used].tolist(), strict=True))


def check_table(table: CuckooTable, expected: dict[int, int]) -> None:
    """The table holds exactly ``expected`` (id -> row), each id once, in one of its buckets."""
    used = table.keys != EMPTY_KEY
    # slot_rows agree with keys: -1 exactly where the slot is free
    assert torch.equal(used, table.slot_rows != -1)
    stored = table.keys[used]
    assert stored.unique().numel() == stored.numel(), "an id is stored twice"
    # every stored id sits in one of its two buckets
    bucket = torch.nonzero(used).squeeze(1) // SLOTS
    first, second = bucket_pair(stored, table.num_buckets)
    assert bool(((bucket == first) | (bucket == second)).all()), "an id sits outside its buckets"
    assert stored_pairs(table) == expected
    # both lookups find every stored id at its row
    ids = torch.tensor(list(expected), dtype=torch.int64)
    rows = torch.tensor(list(expected.values()), dtype=torch.int64)
    assert torch.equal(kc.cuckoo_lookup(table, ids), rows)
    assert torch.equal(clone_table(table).lookup(ids), rows)


def insert_and_check(table, expected, ids, rows, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel insert of fresh pairs; checks conservation and the table; updates ``expected``."""
    before = dict(expected)
    homeless_ids, homeless_rows = kc.cuckoo_insert(table, ids, rows, **kwargs)
    assert homeless_ids.dtype == torch.int64 and homeless_rows.dtype == torch.int64
    expected.update(zip(ids.tolist(), rows.tolist(), strict=True))
    homeless = dict(zip(homeless_ids.tolist(), homeless_rows.tolist(), strict=True))
    assert len(homeless) == homeless_ids.numel(), "a homeless id is reported twice"
    for key, row in homeless.items():  # a homeless pair is a real pair, with its own row
        assert expected.pop(key) == row
    assert set(expected) | set(homeless) == set(before) | set(ids.tolist())
    check_table(table, expected)
    if homeless_ids.numel():  # homeless ids are not stored
        assert bool((kc.cuckoo_lookup(table, homeless_ids) == -1).all())
    return homeless_ids, homeless_rows


# --- hash -------------------------------------------------------------------------------------


EDGE_IDS = [0, 1, -1, 2**63 - 1, EMPTY_KEY + 1, EMPTY_KEY, 2**32, -(2**32), 2**31 - 1, -(2**31), 12345]


@pytest.mark.parametrize("num_buckets", [1, 2, 3, 8, 1000, 12_345, 2**19, 2**31 - 1, 2**31 + 11, 2**40 + 7])
def test_bucket_pair_matches_reference_bit_for_bit(num_buckets):
    ids = torch.cat([torch.tensor(EDGE_IDS, dtype=torch.int64), random_ids(3000, seed=num_buckets % 1000)])
    want_first, want_second = bucket_pair(ids, num_buckets)
    first, second = kc.bucket_pair_device(ids, num_buckets, block=256)  # 12 programs, the last partial
    assert torch.equal(first, want_first)
    assert torch.equal(second, want_second)
    if num_buckets > 1:
        assert bool((first != second).all())


def test_hash_through_lookups_of_ids_placed_in_one_bucket():
    """An id written by hand only into its first (or only into its second) bucket is found."""
    table = CuckooTable(97)
    ids = random_ids(400, seed=3)
    first, second = bucket_pair(ids, table.num_buckets)
    fill = torch.zeros(table.num_buckets, dtype=torch.int64)
    placed, rows = [], []
    for i, (key, b1, b2) in enumerate(zip(ids.tolist(), first.tolist(), second.tolist(), strict=True)):
        bucket = b1 if i % 2 == 0 else b2  # even ids only in the first bucket, odd only in the second
        if fill[bucket] < SLOTS:
            table.keys[bucket * SLOTS + fill[bucket]] = key
            table.slot_rows[bucket * SLOTS + fill[bucket]] = 1000 + i
            fill[bucket] += 1
            placed.append(key)
            rows.append(1000 + i)
    assert len(placed) > 300
    assert torch.equal(kc.cuckoo_lookup(table, torch.tensor(placed)), torch.tensor(rows))


# --- lookup -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_table() -> tuple[CuckooTable, torch.Tensor, torch.Tensor]:
    """A reference-filled table at ~0.9 load: 512 buckets, 3686 ids with shuffled rows."""
    num_buckets = 512
    n = int(num_buckets * SLOTS * 0.9)
    ids = random_ids(n, seed=1)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2)).to(torch.int64)
    return reference_table(num_buckets, ids, rows), ids, rows


@pytest.mark.parametrize("block", [None, 64])
def test_lookup_matches_reference(full_table, block):
    table, ids, rows = full_table
    assert table.load_factor() >= 0.89
    absent = random_ids(3000, seed=5, exclude=ids)
    # absent ids whose two buckets are both full: the probe must read all 16 slots and miss
    first, second = bucket_pair(absent, table.num_buckets)
    free = (table.keys.view(-1, SLOTS) == EMPTY_KEY).sum(dim=1)
    both_full = absent[(free[first] == 0) & (free[second] == 0)]
    assert both_full.numel() >= 100
    # present ids whose buckets are both full
    pf, ps = bucket_pair(ids, table.num_buckets)
    present_full = (free[pf] == 0) & (free[ps] == 0)
    assert int(present_full.sum()) >= 100
    edge = torch.tensor([EMPTY_KEY, EMPTY_KEY + 1, 0, -1, 2**63 - 1], dtype=torch.int64)
    queries = torch.cat([ids, absent, both_full, edge])[
        torch.randperm(ids.numel() + absent.numel() + both_full.numel() + 5)
    ]

    got = kc.cuckoo_lookup(table, queries, block=block)
    assert got.dtype == torch.int64 and got.shape == queries.shape
    assert torch.equal(got, table.lookup(queries))
    # and the reference itself is right: rows of present ids, -1 elsewhere
    want = dict(zip(ids.tolist(), rows.tolist(), strict=True))
    assert got.tolist() == [want.get(q, -1) for q in queries.tolist()]
    assert torch.equal(kc.cuckoo_lookup(table, ids[present_full], block=block), rows[present_full])


def test_lookup_never_matches_a_free_slot():
    """EMPTY_KEY queries miss even if a free slot's row were not -1 (the kernel masks them out)."""
    table = CuckooTable(4)
    table.slot_rows.fill_(7)  # deliberately inconsistent: free slots with a row
    got = kc.cuckoo_lookup(table, torch.tensor([EMPTY_KEY, EMPTY_KEY, 5], dtype=torch.int64))
    assert got.tolist() == [-1, -1, -1]


def test_lookup_empty_and_shaped_queries(full_table):
    table, ids, rows = full_table
    assert kc.cuckoo_lookup(table, torch.empty(0, dtype=torch.int64)).numel() == 0
    assert torch.equal(kc.cuckoo_lookup(table, ids[:12].view(3, 4)), rows[:12].view(3, 4))


def test_table_dispatches_to_the_kernels(full_table, monkeypatch):
    """CuckooTable(backend="triton") goes through kernels.cuckoo for lookup and insert."""
    monkeypatch.setitem(sys.modules, "kernels.cuckoo", kc)
    calls = []
    monkeypatch.setattr(kc, "launch_insert", _spy(kc.launch_insert, calls, "insert"))
    monkeypatch.setattr(kc, "launch_lookup", _spy(kc.launch_lookup, calls, "lookup"))
    reference, ids, rows = full_table
    table = clone_table(reference, backend="triton")
    assert torch.equal(table.lookup(ids), rows)
    new = random_ids(50, seed=9, exclude=ids)
    homeless, _ = table.insert(new, torch.arange(50) + 10_000)
    assert homeless.numel() == 0
    assert torch.equal(table.lookup(new), torch.arange(50) + 10_000)
    assert calls == ["lookup", "insert", "lookup"]


def _spy(launch, calls, name):
    def spy(*args, **kwargs):
        calls.append(name)
        return launch(*args, **kwargs)

    return spy


# --- segmented lookup (IdPartition) -------------------------------------------------------------


def _blocks() -> list[FeatureBlock]:
    """Features of very different sizes, from a 1-bucket table to a few thousand rows, both policies."""
    zero = FeatureIdPolicy(admit_after=1, expire_after_hours=0, unadmitted="zero")
    default = FeatureIdPolicy(admit_after=1, expire_after_hours=0, unadmitted="default_row")
    twice = FeatureIdPolicy(admit_after=2, expire_after_hours=1, unadmitted="default_row")
    expiring = FeatureIdPolicy(admit_after=1, expire_after_hours=1, unadmitted="default_row")
    return [
        FeatureBlock("tiny", zero, 0, 6),  # 1 bucket
        FeatureBlock("user", default, 0, 2500),
        FeatureBlock("item", twice, 0, 90),  # 12 buckets, overfull: evictions, re-admissions
        FeatureBlock("cat", zero, 40, 40),  # a later partition's block (no reserved row), 6 buckets
        FeatureBlock("geo", expiring, 0, 700),  # room for its ids: rows freed by expiry
    ]


def _stream(num_batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(feature, ids) batches over per-feature vocabularies, some ids shared between features."""
    gen = torch.Generator().manual_seed(seed)
    vocabulary = random_ids(4000, seed=seed)
    sizes = torch.tensor([10, 3000, 300, 60, 500])  # distinct ids per feature: tiny/item/cat overflow
    out = []
    for _ in range(num_batches):
        feature = torch.randint(0, len(sizes), (batch,), generator=gen)
        ids = vocabulary[(torch.rand(batch, generator=gen) * sizes[feature]).long()]
        out.append((feature, ids))
    return out


@pytest.fixture(scope="module")
def filled_partition() -> IdPartition:
    """A torch-backend partition of 5 features filled through ``assign`` (~4000 distinct pairs)."""
    part = IdPartition(_blocks(), "lru", sketch=(1 << 12, 2))
    for step, (feature, ids) in enumerate(_stream(6, 1500, seed=71)):
        part.assign(feature, ids, torch.full_like(ids, step * 60_000), clock_ms=step * 60_000)
    return part


@pytest.mark.parametrize("block", [None, 64])
def test_segmented_lookup_matches_partition_lookup(filled_partition, block):
    part = filled_partition
    stored = part.row_keys != EMPTY_KEY
    flat_rows = stored.nonzero().squeeze(1)
    owner = torch.bucketize(flat_rows, part._row_base, right=True) - 1
    present_ids, present_feature = part.row_keys[stored], owner
    assert present_ids.numel() > 1500 and set(owner.tolist()) == set(range(len(part.names)))
    absent = random_ids(1500, seed=72, exclude=present_ids)
    edge = torch.tensor([EMPTY_KEY, EMPTY_KEY + 1, 0, -1, 2**63 - 1], dtype=torch.int64)
    gen = torch.Generator().manual_seed(73)
    ids = torch.cat([present_ids, present_ids, absent, edge])
    other_table = (present_feature + torch.randint(1, 5, present_feature.shape, generator=gen)) % 5
    unknown_table = torch.randint(0, 5, (absent.numel() + edge.numel(),), generator=gen)
    feature = torch.cat([present_feature, other_table, unknown_table])
    order = torch.randperm(ids.numel(), generator=gen)
    ids, feature = ids[order], feature[order]

    want = part.lookup(feature, ids)
    got = kc.cuckoo_lookup_segmented(
        part.keys, part.slot_rows, feature, ids, part._slot_base, part._num_buckets, block=block
    )
    assert got.dtype == torch.int64 and torch.equal(got, want)
    # the reference is right too: each stored id at its local row in its own table, -1 elsewhere
    local = flat_rows - part._row_base[owner]
    expected = dict(
        zip(zip(present_feature.tolist(), present_ids.tolist(), strict=True), local.tolist(), strict=True)
    )
    assert got.tolist() == [
        expected.get(pair, -1) for pair in zip(feature.tolist(), ids.tolist(), strict=True)
    ]
    # ids stored in one table and asked of another one that does not hold them: absent
    assert int(((got < 0) & torch.isin(ids, present_ids)).sum()) > 500
    # shapes, empty queries, int32 feature indices
    assert torch.equal(
        kc.cuckoo_lookup_segmented(
            part.keys,
            part.slot_rows,
            feature[:12].view(3, 4).int(),
            ids[:12].view(3, 4),
            part._slot_base,
            part._num_buckets,
        ),
        want[:12].view(3, 4),
    )
    empty = torch.empty(0, dtype=torch.int64)
    assert (
        kc.cuckoo_lookup_segmented(
            part.keys, part.slot_rows, empty, empty, part._slot_base, part._num_buckets
        ).numel()
        == 0
    )
    with pytest.raises(ValueError):
        kc.cuckoo_lookup_segmented(
            part.keys, part.slot_rows, feature[:3], ids[:4], part._slot_base, part._num_buckets
        )


def test_partition_triton_backend_matches_torch(monkeypatch):
    """IdPartition(backend="triton") (segmented lookup kernel + insert kernel) assigns the same rows
    as the torch backend, step by step, through admissions, expiry and evictions of full tables."""
    monkeypatch.setitem(sys.modules, "kernels.cuckoo", kc)
    calls = []
    monkeypatch.setattr(kc, "launch_lookup_segmented", _spy(kc.launch_lookup_segmented, calls, "lookup"))
    monkeypatch.setattr(kc, "launch_insert", _spy(kc.launch_insert, calls, "insert"))
    torch_part = IdPartition(_blocks(), "lfu", sketch=(1 << 12, 2), backend="torch")
    triton_part = IdPartition(_blocks(), "lfu", sketch=(1 << 12, 2), backend="triton")
    assert triton_part.backend == "triton" and all(t.backend == "triton" for t in triton_part.tables)
    for step, (feature, ids) in enumerate(_stream(6, 800, seed=81)):
        clock = step * 1_800_000  # half an hour per step: "item" ids expire after an hour
        times = torch.full_like(ids, clock)
        want_rows, want_admitted = torch_part.assign(feature, ids, times, clock)
        got_rows, got_admitted = triton_part.assign(feature, ids, times, clock)
        assert torch.equal(got_rows, want_rows), f"step {step}"
        assert got_admitted.keys() == want_admitted.keys()
        for name, admitted in want_admitted.items():
            assert torch.equal(got_admitted[name].rows, admitted.rows)
            assert torch.equal(got_admitted[name].ids, admitted.ids)
        assert torch.equal(triton_part.stats, torch_part.stats)
        assert torch.equal(triton_part.row_keys, torch_part.row_keys)
    stats = dict(zip(STAT_NAMES, torch_part.stats.sum(0).tolist(), strict=True))
    assert stats["admitted"] > 1000 and stats["expired"] > 0 and stats["evicted_full"] > 0
    assert "lookup" in calls and "insert" in calls
    # final lookups of every (feature, id) of the stream
    feature = torch.cat([f for f, _ in _stream(6, 800, seed=81)])
    ids = torch.cat([i for _, i in _stream(6, 800, seed=81)])
    want = torch_part.lookup(feature, ids)
    assert torch.equal(triton_part.lookup(feature, ids), want)
    assert bool((want >= 0).any()) and bool((want < 0).any())


# --- insert -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 64])
def test_insert_into_empty_table(block):
    table = CuckooTable(512)
    n = int(512 * SLOTS * 0.85)
    ids = random_ids(n, seed=11)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(12))
    locks = torch.zeros(table.num_buckets, dtype=torch.int32)
    homeless, _ = insert_and_check(table, {}, ids, rows, block=block, locks=locks)
    assert homeless.numel() == 0
    assert int(locks.abs().sum()) == 0, "a lock was left taken"


def test_insert_into_reference_filled_table_until_homeless():
    """Fresh batches into a table the reference filled to 0.6, until the first homeless id."""
    num_buckets = 128
    base_ids = random_ids(int(num_buckets * SLOTS * 0.6), seed=21)
    table = reference_table(num_buckets, base_ids, torch.arange(base_ids.numel()))
    expected = stored_pairs(table)
    fresh = random_ids(num_buckets * SLOTS, seed=22, exclude=base_ids)
    next_row, batch = base_ids.numel(), 48
    for start in range(0, fresh.numel(), batch):
        ids = fresh[start : start + batch]
        rows = torch.arange(next_row, next_row + ids.numel())
        next_row += ids.numel()
        homeless, _ = insert_and_check(table, expected, ids, rows, block=64)
        if homeless.numel():
            break
    else:
        pytest.fail("the table never reported a homeless id")
    assert table.load_factor() >= 0.9, f"first homeless id at load {table.load_factor():.3f}"


def test_fill_empty_table_until_homeless():
    table = CuckooTable(128)
    expected: dict[int, int] = {}
    fresh = random_ids(128 * SLOTS + 128, seed=31)
    for start in range(0, fresh.numel(), 128):
        ids = fresh[start : start + 128]
        homeless, _ = insert_and_check(
            table, expected, ids, torch.arange(start, start + ids.numel()), block=128
        )
        if homeless.numel():
            break
    assert table.load_factor() >= 0.9, f"first homeless id at load {table.load_factor():.3f}"


def test_displacement_chains_in_a_tiny_table():
    """Ids whose two buckets are both full must displace residents, in chains when the victims'
    other buckets are full too: 6 buckets, the first 3 filled by hand, new ids aimed at them."""
    table = CuckooTable(6)
    pool = random_ids(2000, seed=41)
    first, second = bucket_pair(pool, table.num_buckets)
    fill = [0] * table.num_buckets
    placed = []
    for key, b1 in zip(pool.tolist(), first.tolist(), strict=True):
        if b1 < 3 and fill[b1] < SLOTS:  # residents of buckets 0-2 (their other bucket: anywhere)
            table.keys[b1 * SLOTS + fill[b1]] = key
            table.slot_rows[b1 * SLOTS + fill[b1]] = len(placed)
            fill[b1] += 1
            placed.append(key)
    assert len(placed) == 3 * SLOTS
    blocked = pool[(first < 3) & (second < 3) & ~torch.isin(pool, torch.tensor(placed))][:6]
    assert blocked.numel() == 6
    slots_before = {int(k): i for i, k in enumerate(table.keys.tolist()) if k != EMPTY_KEY}
    expected = stored_pairs(table)
    homeless, _ = insert_and_check(table, expected, blocked, torch.arange(100, 106))
    assert homeless.numel() == 0
    assert table.size() == 3 * SLOTS + 6
    slots_after = {int(k): i for i, k in enumerate(table.keys.tolist()) if k != EMPTY_KEY}
    moved = [k for k, slot in slots_before.items() if slots_after[k] != slot]
    assert len(moved) >= 6, "residents were not displaced"


@pytest.mark.parametrize("num_buckets", [1, 2, 3])
def test_overfull_tiny_table_loses_and_duplicates_nothing(num_buckets):
    """More ids than slots: displaced residents may end homeless, but every pair is accounted for."""
    capacity = num_buckets * SLOTS
    ids = random_ids(capacity + 9, seed=50 + num_buckets)
    prefill = capacity - 2
    table = reference_table(num_buckets, ids[:prefill], torch.arange(prefill))
    expected = stored_pairs(table)
    homeless, _ = insert_and_check(
        table, expected, ids[prefill:], torch.arange(prefill, ids.numel()), max_rounds=40
    )
    assert homeless.numel() >= 9
    assert table.size() + homeless.numel() == ids.numel()


def test_insert_zero_rounds_and_empty_key_ids():
    table = CuckooTable(16)
    ids = random_ids(20, seed=61)
    homeless, rows = kc.cuckoo_insert(table, ids, torch.arange(20), max_rounds=0)
    assert sorted(homeless.tolist()) == sorted(ids.tolist())
    assert dict(zip(homeless.tolist(), rows.tolist(), strict=True)) == dict(
        zip(ids.tolist(), range(20), strict=True)
    )
    assert table.size() == 0
    # an EMPTY_KEY id (callers fold them) cannot be stored: it comes back homeless, the rest goes in
    mixed = torch.cat([ids[:5], torch.tensor([EMPTY_KEY]), ids[5:10]])
    homeless, rows = insert_and_check(table, {}, mixed, torch.arange(11))
    assert homeless.tolist() == [EMPTY_KEY] and rows.tolist() == [5]


def test_insert_rejects_bad_arguments():
    table = CuckooTable(4)
    with pytest.raises(ValueError):
        kc.cuckoo_insert(table, torch.arange(3), torch.arange(2))
    with pytest.raises(ValueError):
        kc.cuckoo_insert(table, torch.arange(3), torch.arange(3), locks=torch.zeros(2, dtype=torch.int32))


# --- ahead-of-time compilation and the benchmark ------------------------------------------------


def _env_without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_kernel_list_is_complete():
    assert {spec.name for spec in kc.KERNELS} == KERNEL_NAMES
    for spec in kc.KERNELS:
        params = list(spec.kernel.arg_names)
        assert list(spec.signature) == params, f"{spec.name}: signature does not list the kernel's arguments"
        assert set(spec.constexprs) == {k for k, v in spec.signature.items() if v == "constexpr"}


def _run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, compiled (not interpreted) by default."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env or _env_without_interpreter(),
        cwd=ROOT,
        timeout=300,
    )


def test_compile_all_for_sm80_and_sm90(tmp_path):
    proc = _run_module("kernels.compile_all", "--arch", "80", "90", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in KERNEL_NAMES:
        for arch in (80, 90):
            cubin = tmp_path / f"{name}.sm_{arch}.cubin"
            assert cubin.exists() and cubin.read_bytes()[:4] == b"\x7fELF", f"no cubin for {name} sm_{arch}"
            ptx = (tmp_path / f"{name}.sm_{arch}.ptx").read_text()
            assert f".target sm_{arch}" in ptx
            assert f"ok   {name} sm_{arch}:" in proc.stdout
    # the insert kernel's lock protocol made it to the hardware
    ptx = (tmp_path / "cuckoo_insert.sm_90.ptx").read_text()
    assert "atom.global.gpu.acquire.exch.b32" in ptx and "atom.global.gpu.release.exch.b32" in ptx
    assert "ld.volatile.global" in ptx and "bar.sync" in ptx


def test_compile_all_refuses_the_interpreter():
    proc = _run_module("kernels.compile_all", env=_env_without_interpreter() | {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def _bench(*args: str) -> dict:
    proc = _run_module("kernels.bench_cuckoo", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_benchmark_on_a_gpu_or_refusing_without_one():
    """With a GPU: the compiled kernels under real contention between CTAs, checked by the bench
    (a large table and a tiny one where every bucket is fought over). Without: exit 2, clearly."""
    if torch.cuda.is_available():  # pragma: no cover - only on GPU machines
        for args in (
            ["--slots", "1048576", "--load", "0.95"],
            ["--slots", "512", "--load", "0.95", "--lookups", "4096"],
        ):
            result = _bench(*args, "--iters", "3", "--warmup", "1")
            assert result["device"] == "cuda" and result["checked"] is True
            assert result["load_factor"] >= 0.93
        return
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.bench_cuckoo"],
        capture_output=True,
        text=True,
        env=_env_without_interpreter(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_benchmark_under_the_interpreter():
    """--interpret sets TRITON_INTERPRET before importing triton (the other import order from here)."""
    result = _bench("--interpret")
    assert result["device"] == "cpu" and result["interpret"] is True and result["checked"] is True
    assert result["lookups_per_s"] > 0 and result["inserts_per_s"] > 0
    assert result["load_factor"] >= 0.85
