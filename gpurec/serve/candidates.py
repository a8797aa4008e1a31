"""The feed's candidate source: a few hundred distinct items per request, from the live streams.

It follows three topics of the event log and keeps, in event time:

- **fresh uploads** (`items` topic): items uploaded in the last `fresh_window_ms`, newest first;
- **trending** (`actions` topic): recency-decayed engagement per item, globally and per (region,
  language) of the item; an action weighs `ENGAGEMENT_WEIGHTS` (a valid play, >= 7 s, counts 1;
  likes, comments 2; shares, follows 3) and halves every `half_life_ms` of event time;
- **what each user was shown** (`served` topic, and the feed's own requests at once): the items
  of the user's last `exclude_requests` requests are not offered again, and the user's (region,
  language) is remembered from the inputs served to them.

Why the `actions` topic and not the feature store's counters: the store keeps lifetime counts per
item (no decay, no region split) and cannot list its top items; the log gives event time, so the
decay and the per-region pools come from one sequential read that the store never sees.

A request takes `fresh` + `regional` + `trending` items (100 + 100 + 100 by default) from those
pools, deduplicated, without the user's recent items; a pool that runs short is filled from the
others. Regions are matched on hashed ids: an item's region and language are hashed with the
`user_region` / `user_language` features' rules, the same ids the feature store and the served
inputs hold for the user, so no raw profile is needed. A user the source has not seen yet (first
request to this instance, no served history) gets fresh and global items only.

Event time, not wall time: every method takes `now_ms` (the simulation runs event time faster than
wall time). Items uploaded after `now_ms` are never candidates. Engagement already read counts even
if its action lies after `now_ms` (the source cannot un-read it; live, the difference is the log's
lag). The pools are rebuilt by `refresh()` (the follower does it after new records, at most every
`refresh_interval_s`) and read lock-free by requests: a request sees one consistent snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from gpurec.data.hashing_core import PAD_ID, hash_raw_values
from gpurec.data.schema import MS_PER_DAY
from gpurec.errors import InvalidInput
from gpurec.serve.items import Item
from gpurec.stream.records import Action, ServedRow

ACTIONS_TOPIC: Final = "actions"
SERVED_TOPIC: Final = "served"
MS_PER_HOUR: Final = 3_600_000
VALID_PLAY_MS: Final = 7_000  # the calibration's "valid play" (README, synthetic world)
ENGAGEMENT_WEIGHTS: Final = {"valid_play": 1.0, "like": 2.0, "comment": 2.0, "share": 3.0, "follow": 3.0}
REGION_FEATURES: Final = ("user_region", "user_language")
# A decayed score below this (an action about 13 half-lives ago) is forgotten.
MIN_SCORE: Final = 1e-4
# Scores are kept relative to a reference time, moved forward when the exponent would grow large.
REBASE_HALF_LIVES: Final = 32
FORGET_INTERVAL_S: Final = 60.0
BACKOFF_S: Final = 0.5  # the first wait after a failed read of the log, doubling up to 10 s  # how often metadata of old, unengaged items is dropped (a full scan)

RegionKey = tuple[int, int]
"""(hashed region, hashed language) with the `user_region` / `user_language` features' rules."""


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates come from each pool and how the pools age (event-time milliseconds)."""

    fresh: int = 100
    regional: int = 100
    trending: int = 100
    fresh_window_ms: int = 2 * MS_PER_DAY
    half_life_ms: int = 6 * MS_PER_HOUR
    exclude_requests: int = 3
    max_users: int = 100_000
    item_horizon_ms: int = 30 * MS_PER_DAY
    pool_depth: int = 4
    """Each pool's snapshot keeps `pool_depth` x its quota, so filtering rarely runs it dry."""

    def __post_init__(self) -> None:
        for name in ("fresh", "regional", "trending", "exclude_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidInput(f"candidates: {name} must be an integer >= 0, got {value!r}")
        for name in ("fresh_window_ms", "half_life_ms", "max_users", "item_horizon_ms", "pool_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"candidates: {name} must be a positive integer, got {value!r}")
        if self.total == 0:
            raise InvalidInput("candidates: fresh + regional + trending must be at least 1")

    @property
    def total(self) -> int:
        return self.fresh + self.regional + self.trending


@dataclass(frozen=True)
class Candidates:
    """One request's candidates (distinct item ids) and how many each pool gave."""

    item_ids: np.ndarray
    fresh: int = 0
    regional: int = 0
    trending: int = 0
    excluded: int = 0
    """Pool entries skipped because the user was shown them in their last requests."""

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


@dataclass(frozen=True)
class _Pool:
    """Item ids, best first, with their upload times (for the event-time filter)."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    upload_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class _Pools:
    fresh: _Pool = field(default_factory=_Pool)
    trending: _Pool = field(default_factory=_Pool)
    regional: dict[RegionKey, _Pool] = field(default_factory=dict)


class _User:
    __slots__ = ("recent", "region")

    def __init__(self, depth: int) -> None:
        self.region: RegionKey | None = None
        self.recent: deque[tuple[int, set[int]]] = deque(maxlen=depth)  # (request_id, item ids)


_REGION_RULES: dict[str, str] | None = None


def region_key(region: str, language: str) -> RegionKey | None:
    """The hashed (region, language) an item is pooled under; None without the two features."""
    global _REGION_RULES
    if _REGION_RULES is None:
        from gpurec.preprocess.features import raw_hashing_rules

        _REGION_RULES = raw_hashing_rules(REGION_FEATURES)
    if len(_REGION_RULES) < len(REGION_FEATURES):
        return None
    hashed = [int(hash_raw_values([v], f, _REGION_RULES[f])[0]) for v, f in zip((region, language), REGION_FEATURES, strict=True)]
    return hashed[0], hashed[1]


def engagement(action: Action) -> float:
    """How much one action says an item is worth showing (0 for a quick skip with nothing else)."""
    w = ENGAGEMENT_WEIGHTS
    played = action.watch_ms >= VALID_PLAY_MS and not action.skip
    return (
        w["valid_play"] * played
        + w["like"] * action.like
        + w["comment"] * action.comment
        + w["share"] * action.share
        + w["follow"] * action.follow
    )


class _Slots:
    """One slot per known item in parallel arrays (id, upload time, region code, decayed score), so
    the pools are rebuilt by numpy sorts instead of Python loops over the catalogue."""

    def __init__(self, capacity: int = 1024) -> None:
        self.index: dict[int, int] = {}
        self.size = 0
        self.ids = np.zeros(capacity, np.int64)
        self.upload = np.zeros(capacity, np.int64)
        self.region = np.full(capacity, -1, np.int32)
        self.score = np.zeros(capacity, np.float64)

    def slot(self, item_id: int) -> int:
        slot = self.index.get(item_id)
        if slot is None:
            if self.size == len(self.ids):
                for name in ("ids", "upload", "region", "score"):
                    old = getattr(self, name)
                    grown = np.full(2 * len(old), -1 if name == "region" else 0, old.dtype)
                    grown[: len(old)] = old
                    setattr(self, name, grown)
            slot = self.index[item_id] = self.size
            self.ids[slot] = item_id
            self.size += 1
        return slot

    def keep(self, mask: np.ndarray) -> np.ndarray:
        """Drop the slots where `mask` is False; returns the dropped item ids."""
        n = self.size
        dropped = self.ids[:n][~mask]
        for name in ("ids", "upload", "region", "score"):
            array = getattr(self, name)
            kept = array[:n][mask]
            array[: len(kept)] = kept
        self.size = int(mask.sum())
        self.index = {int(i): k for k, i in enumerate(self.ids[: self.size].tolist())}
        return dropped


class CandidateSource:
    """Fresh, regional-trending and global-trending candidates; see the module docstring.

    Ingestion (`add_*`, `refresh`) runs on one thread (the follower's, or a test's); `candidates`,
    `note_shown`, `note_user_region` and `item` may be called from any thread at the same time.
    """

    def __init__(self, config: CandidateConfig | None = None) -> None:
        self.config = config or CandidateConfig()
        self._items: dict[int, Item] = {}
        self._slots = _Slots()
        self._region_keys: dict[tuple[str, str], RegionKey | None] = {}
        self._region_codes: dict[RegionKey, int] = {}
        self._regions: list[RegionKey] = []
        self._early_scores: dict[int, float] = {}  # engagement of items whose upload is not read yet
        self._ref_ms: int | None = None  # scores are relative to 2 ** (ref_ms / half-life)
        self._users: OrderedDict[int, _User] = OrderedDict()
        self._users_lock = threading.Lock()
        self._pools = _Pools()
        self._forgotten_at = time.monotonic()
        self.newest_ms = 0
        """The newest event time read from any followed topic."""
        self.counts: dict[str, int] = dict.fromkeys(("items", "actions", "served", "invalid"), 0)

    # ---- ingestion ----------------------------------------------------------------------------

    def add_items(self, items: Iterable[Item]) -> None:
        slots = self._slots
        for item in items:
            self._items[item.item_id] = item
            names = (item.region, item.language)
            if names not in self._region_keys:
                self._region_keys[names] = region_key(*names)
            key = self._region_keys[names]
            if key is not None and key not in self._region_codes:
                self._region_codes[key] = len(self._regions)
                self._regions.append(key)
            slot = slots.slot(item.item_id)
            slots.upload[slot] = item.upload_ts_ms
            slots.region[slot] = -1 if key is None else self._region_codes[key]
            slots.score[slot] += self._early_scores.pop(item.item_id, 0.0)
            self.newest_ms = max(self.newest_ms, item.upload_ts_ms)
            self.counts["items"] += 1

    def add_actions(self, actions: Iterable[Action]) -> None:
        half_life = self.config.half_life_ms
        index, scores = self._slots.index, self._slots.score
        for action in actions:
            self.counts["actions"] += 1
            self.newest_ms = max(self.newest_ms, action.ts_ms)
            weight = engagement(action)
            if weight <= 0:
                continue
            if self._ref_ms is None:
                self._ref_ms = action.ts_ms
            elif action.ts_ms - self._ref_ms > REBASE_HALF_LIVES * half_life:
                self._rebase(action.ts_ms)
                scores = self._slots.score
            gain = weight * 2.0 ** ((action.ts_ms - self._ref_ms) / half_life)
            slot = index.get(action.item_id)
            if slot is None:  # its upload record is still on its way
                self._early_scores[action.item_id] = self._early_scores.get(action.item_id, 0.0) + gain
            else:
                scores[slot] += gain

    def add_served(self, rows: Iterable[ServedRow]) -> None:
        """What users were shown (by any feed instance): their recent items, and their region."""
        for row in rows:
            self.counts["served"] += 1
            self.newest_ms = max(self.newest_ms, row.ts_ms)
            self.note_shown(row.user_id, row.request_id, (row.item_id,))
            if row.position == 0:  # one row per request is enough to learn the user's region
                sparse = row.model_inputs().sparse
                ids = [sparse.get(name, (PAD_ID,)) for name in REGION_FEATURES]
                if all(len(i) == 1 for i in ids):
                    self.note_user_region(row.user_id, (ids[0][0], ids[1][0]))

    def note_shown(self, user_id: int, request_id: int, item_ids: Iterable[int]) -> None:
        with self._users_lock:
            recent = self._user(user_id).recent
            for rid, shown in recent:
                if rid == request_id:
                    shown.update(item_ids)
                    return
            recent.append((request_id, set(item_ids)))

    def note_user_region(self, user_id: int, key: RegionKey | None) -> None:
        """The user's hashed (region, language); PAD ids (an unknown user) are not a region."""
        if key is None or PAD_ID in key:
            return
        with self._users_lock:
            self._user(user_id).region = (int(key[0]), int(key[1]))

    def _user(self, user_id: int) -> _User:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User(self.config.exclude_requests)
            if len(self._users) > self.config.max_users:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(user_id)
        return user

    def _rebase(self, ref_ms: int) -> None:
        """Move the reference time to `ref_ms`, forgetting scores that decayed below MIN_SCORE."""
        assert self._ref_ms is not None
        factor = 2.0 ** ((self._ref_ms - ref_ms) / self.config.half_life_ms)
        scores = self._slots.score
        scores *= factor
        scores[scores < MIN_SCORE] = 0.0
        self._early_scores = {i: s * factor for i, s in self._early_scores.items() if s * factor >= MIN_SCORE}
        self._ref_ms = ref_ms

    # ---- the pools ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the pools from what has been read (the follower calls this)."""
        c = self.config
        if self._ref_ms is not None and self.newest_ms - self._ref_ms > c.half_life_ms:
            self._rebase(self.newest_ms)
        slots, n = self._slots, self._slots.size
        ids, upload, region, score = slots.ids[:n], slots.upload[:n], slots.region[:n], slots.score[:n]
        # Fresh: twice the window, as a request may be timed before the newest event read (replays, lag).
        recent = np.flatnonzero(upload >= self.newest_ms - 2 * c.fresh_window_ms)
        recent = recent[np.lexsort((ids[recent], -upload[recent]))][: c.pool_depth * c.fresh]
        # Trending: best first, ties by id, so every instance builds the same pools.
        scored = np.flatnonzero(score > 0)
        ranked = scored[np.lexsort((ids[scored], -score[scored]))]
        by_region = ranked[np.argsort(region[ranked], kind="stable")]  # score order kept within a region
        codes = region[by_region]
        regional: dict[RegionKey, _Pool] = {}
        if len(codes):
            starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
            ends = np.r_[starts[1:], len(codes)]
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                if codes[start] >= 0:
                    members = by_region[start : min(end, start + c.pool_depth * c.regional)]
                    regional[self._regions[int(codes[start])]] = self._pool(members)
        self._pools = _Pools(self._pool(recent), self._pool(ranked[: c.pool_depth * c.trending]), regional)
        if time.monotonic() - self._forgotten_at >= FORGET_INTERVAL_S:
            self.forget_old_items()

    def _pool(self, slots: np.ndarray) -> _Pool:
        return _Pool(self._slots.ids[slots].copy(), self._slots.upload[slots].copy())

    def forget_old_items(self) -> None:
        """Drop items uploaded before `item_horizon_ms` that are no longer trending (bounded memory;
        `refresh` does it every `FORGET_INTERVAL_S`)."""
        self._forgotten_at = time.monotonic()
        n = self._slots.size
        cutoff = self.newest_ms - self.config.item_horizon_ms
        keep = (self._slots.upload[:n] >= cutoff) | (self._slots.score[:n] > 0)
        if not keep.all():
            for item_id in self._slots.keep(keep).tolist():
                self._items.pop(item_id, None)

    # ---- requests -----------------------------------------------------------------------------

    def item(self, item_id: int) -> Item | None:
        return self._items.get(item_id)

    def user_region(self, user_id: int) -> RegionKey | None:
        with self._users_lock:
            user = self._users.get(user_id)
            return None if user is None else user.region

    def candidates(self, user_id: int, now_ms: int, limit: int | None = None) -> Candidates:
        """Up to `limit` (default: the configured total) distinct items for `user_id` at `now_ms`."""
        c = self.config
        pools = self._pools  # one snapshot for the whole request
        with self._users_lock:
            user = self._users.get(user_id)
            region = None if user is None else user.region
            seen = set().union(*(shown for _, shown in user.recent)) if user is not None else set()
        fresh = _visible(pools.fresh, now_ms - c.fresh_window_ms, now_ms)
        trending = _visible(pools.trending, None, now_ms)
        regional = _visible(pools.regional[region], None, now_ms) if region in pools.regional else []
        # a short pool's share goes to the others: trending first, then fresh, then regional
        return _choose((fresh, regional, trending), (c.fresh, c.regional, c.trending), (2, 0, 1), seen, self._total(limit))

    def popular(self, region: RegionKey | None, now_ms: int, limit: int | None = None) -> Candidates:
        """Candidates of a request without a profile (a user without personalisation consent).

        Popularity only: the items trending in `region` (the user's hashed region and language, from
        their profile) and globally; fresh uploads only fill in when those run short (a new
        deployment with no engagement yet). Nothing else of the user is read: not their recent
        items, not the region remembered from their requests. So at one event time every user of
        one region and language gets the same candidates, in the same order.
        """
        c = self.config
        pools = self._pools
        fresh = _visible(pools.fresh, now_ms - c.fresh_window_ms, now_ms)
        trending = _visible(pools.trending, None, now_ms)
        regional = _visible(pools.regional[region], None, now_ms) if region in pools.regional else []
        return _choose((fresh, regional, trending), (0, c.regional, c.trending), (2, 1, 0), set(), self._total(limit))

    def _total(self, limit: int | None) -> int:
        return self.config.total if limit is None else min(limit, self.config.total)


def _choose(
    pools: tuple[list[int], list[int], list[int]],
    quotas: tuple[int, int, int],
    fill_order: tuple[int, int, int],
    seen: set[int],
    total: int,
) -> Candidates:
    """Distinct items from the (fresh, regional, trending) pools: each pool's quota, then the pools
    in `fill_order` up to `total`; items in `seen` are skipped (and counted)."""
    chosen: dict[int, None] = {}  # insertion-ordered set
    excluded = 0

    def take(ids: list[int], quota: int) -> int:
        nonlocal excluded
        taken = 0
        for item_id in ids:
            if taken >= quota or len(chosen) >= total:
                break
            if item_id in chosen:
                continue
            if item_id in seen:
                excluded += 1
                continue
            chosen[item_id] = None
            taken += 1
        return taken

    counts = [take(ids, quota) for ids, quota in zip(pools, quotas, strict=True)]
    for i in fill_order:
        counts[i] += take(pools[i], total)
    ids = np.fromiter(chosen, np.int64, len(chosen))
    return Candidates(ids, fresh=counts[0], regional=counts[1], trending=counts[2], excluded=excluded)


def _visible(pool: _Pool, start_ms: int | None, now_ms: int) -> list[int]:
    """The pool's items uploaded by `now_ms` (and since `start_ms`), in pool order."""
    keep = pool.upload_ms <= now_ms
    if start_ms is not None:
        keep &= pool.upload_ms >= start_ms
    return pool.ids[keep].tolist()


__all__ = [
    "ACTIONS_TOPIC",
    "ENGAGEMENT_WEIGHTS",
    "SERVED_TOPIC",
    "CandidateConfig",
    "CandidateSource",
    "Candidates",
    "RegionKey",
    "engagement",
    "region_key",
]
