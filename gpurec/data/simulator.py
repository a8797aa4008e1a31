"""Batch log generation on top of `World`: sessions, the logging policy, and day-by-day logs.

A day of the feed: active users open sessions (diurnal start times) and scroll a budget of items
drawn from a power law; every `page_size` items is one feed request. The logging policy (the
recommender that was live when the logs were written) fills each slot by the user's interests or
by global popularity x freshness; users who opted out of personalisation only get the latter.
The world reacts, and impressions, actions and the oracle are emitted in time order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpurec.data.schema import ACTIONS, IMPRESSIONS, ITEMS, MS_PER_DAY, ORACLE, USERS
from gpurec.data.world import DEVICES, HOUR_WEIGHTS, LANGUAGES, REGIONS, World

SURFACE = "for_you"
LOGGING_POLICY = "sim-popularity-interest-v1"


@dataclass
class DayLogs:
    impressions: pa.Table
    actions: pa.Table
    oracle: pa.Table
    # Row indices into World arrays, aligned with the tables (for statistics without re-reading).
    user_index: np.ndarray
    item_index: np.ndarray


class PopularityInterestPolicy:
    """The logging policy: sample by interest (personalised slots) or by popularity x freshness."""

    def __init__(self, world: World, hour_start_ms: int) -> None:
        self.world = world
        # Freshness as of the hour's start: an item uploaded during the hour is eligible from the next one,
        # so no session can be shown an item before its upload.
        weights = world.item_weights(hour_start_ms)
        self.global_cum = np.cumsum(weights)
        order = np.argsort(world.item_topic, kind="stable")
        self.topic_order = order
        self.topic_cum = np.concatenate([[0.0], np.cumsum(weights[order])])
        bounds = np.searchsorted(world.item_topic[order], np.arange(world.config.topics + 1))
        self.topic_lo = self.topic_cum[bounds[:-1]]
        self.topic_hi = self.topic_cum[bounds[1:]]

    def by_popularity(self, n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(n) * self.global_cum[-1]
        return np.minimum(np.searchsorted(self.global_cum, u, side="right"), len(self.global_cum) - 1)

    def by_topic(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.topic_lo[topics], self.topic_hi[topics]
        u = lo + rng.random(len(topics)) * (hi - lo)
        pos = np.clip(np.searchsorted(self.topic_cum, u, side="right") - 1, 0, len(self.topic_order) - 1)
        picked = self.topic_order[pos]
        empty = hi <= lo  # no live item in that topic yet: fall back to popularity
        if empty.any():
            picked[empty] = self.by_popularity(int(empty.sum()), rng)
        return picked


def _sample_topics(interest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One topic per row of an (n, topics) probability matrix (inverse CDF, vectorised)."""
    cum = np.cumsum(interest, axis=1)
    u = rng.random((len(interest), 1)) * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), interest.shape[1] - 1)


def _power_law(n: int, exponent: float, max_value: int, rng: np.random.Generator) -> np.ndarray:
    values = np.arange(1, max_value + 1)
    p = values.astype(np.float64) ** -exponent
    return rng.choice(values, size=n, p=p / p.sum())


def _dedupe_in_request(
    request: np.ndarray, items: np.ndarray, resample, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of slots to keep so no request shows an item twice (resampling repeats first)."""
    for _ in range(20):
        key = request * np.int64(1 << 32) + items
        _, first = np.unique(key, return_index=True)
        dup = np.ones(len(key), dtype=bool)
        dup[first] = False
        if not dup.any():
            return np.ones(len(items), dtype=bool)
        items[dup] = resample(int(dup.sum()), rng)
    return ~dup


def simulate_day(world: World, day: int, next_request_id: int) -> DayLogs:
    """Simulate every session of `day` (0-based from the world's start) and return its logs."""
    c = world.config
    rng = np.random.default_rng([c.seed, 3, day])
    day_ms = world.start_ms + day * MS_PER_DAY

    # Who is active, how many sessions each, and how far each session scrolls.
    active = np.flatnonzero(rng.random(c.users) < c.daily_active)
    budgets_support = np.arange(1, c.max_session_budget + 1, dtype=np.float64)
    mean_budget = (budgets_support ** (1 - c.session_budget_exponent)).sum() / (
        budgets_support**-c.session_budget_exponent
    ).sum()
    sessions_per_user = np.maximum(1, rng.poisson(world.user_activity[active] / mean_budget))
    session_user = np.repeat(active, sessions_per_user)
    n_sessions = len(session_user)
    budget = _power_law(n_sessions, c.session_budget_exponent, c.max_session_budget, rng)
    hour = rng.choice(24, size=n_sessions, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    session_start = day_ms + hour * 3_600_000 + rng.integers(0, 3_600_000, size=n_sessions)

    # Slots: one per item the session scrolls past; every page_size slots is a feed request.
    slot_session = np.repeat(np.arange(n_sessions), budget)
    first_slot = np.repeat(np.cumsum(budget) - budget, budget)
    slot_pos = np.arange(len(slot_session)) - first_slot
    pages = (budget + c.page_size - 1) // c.page_size
    request_of_page0 = next_request_id + np.cumsum(pages) - pages
    request = request_of_page0[slot_session] + slot_pos // c.page_size
    users = session_user[slot_session]

    # Logging policy, per hour of the session start (freshness moves during the day).
    items = np.empty(len(users), dtype=np.int64)
    personal = (rng.random(len(users)) < c.personalised_share) & world.consent_personalisation[users]
    interest = world.interests(day)
    slot_hour = hour[slot_session]
    for h in np.unique(slot_hour):
        policy = PopularityInterestPolicy(world, day_ms + int(h) * 3_600_000)
        in_hour = slot_hour == h
        pers = np.flatnonzero(in_hour & personal)
        glob = np.flatnonzero(in_hour & ~personal)
        items[pers] = policy.by_topic(_sample_topics(interest[users[pers]], rng), rng)
        items[glob] = policy.by_popularity(len(glob), rng)
    # Repeats within a request are redrawn from items live since the day's start (valid at any hour).
    keep = _dedupe_in_request(request, items, PopularityInterestPolicy(world, day_ms).by_popularity, rng)

    response = world.respond(users, items, day, slot_pos, rng)

    # Time: each impression starts after the previous one's watch time plus a swipe gap.
    gap = rng.integers(200, 1500, size=len(users))
    spent = response.watch_ms + gap
    before = np.cumsum(spent) - spent
    impression_ts = session_start[slot_session] + before - before[first_slot]
    end_of_world = world.start_ms + c.days * MS_PER_DAY
    keep &= impression_ts < end_of_world
    order = np.flatnonzero(keep)[np.argsort(impression_ts[keep], kind="stable")]
    ts = impression_ts[order]

    impressions = pa.table(
        {
            "request_id": pa.array(request[order], pa.int64()),
            "ts": pa.array(ts, pa.int64()).cast(IMPRESSIONS.field("ts").type),
            "user_id": pa.array(world.user_ids[users[order]]),
            "item_id": pa.array(world.item_ids[items[order]]),
            "position": pa.array((slot_pos[order] % c.page_size).astype(np.int32)),
            "surface": pa.array([SURFACE] * len(order), pa.string()),
            "model_version": pa.array([LOGGING_POLICY] * len(order), pa.string()),
        },
        schema=IMPRESSIONS,
    )
    actions = pa.table(
        {
            "request_id": impressions["request_id"],
            "item_id": impressions["item_id"],
            "ts": pa.array(ts + response.watch_ms[order], pa.int64()).cast(ACTIONS.field("ts").type),
            "watch_ms": pa.array(response.watch_ms[order].astype(np.int32)),
            "like": pa.array(response.like[order]),
            "share": pa.array(response.share[order]),
            "comment": pa.array(response.comment[order]),
            "follow": pa.array(response.follow[order]),
            "skip": pa.array(response.skip[order]),
        },
        schema=ACTIONS,
    )
    oracle = pa.table(
        {
            "request_id": impressions["request_id"],
            "item_id": impressions["item_id"],
            "p_like": pa.array(response.p_like[order]),
            "p_finish": pa.array(response.p_finish[order]),
        },
        schema=ORACLE,
    )
    return DayLogs(impressions, actions, oracle, users[order], items[order])


def next_request_id_after(logs: DayLogs, current: int) -> int:
    """Request ids stay unique across days: continue after the largest one issued."""
    if logs.impressions.num_rows == 0:
        return current
    return max(current, int(np.max(logs.impressions["request_id"].to_numpy())) + 1)


def users_table(world: World) -> pa.Table:
    return pa.table(
        {
            "user_id": world.user_ids,
            "region": np.array(REGIONS)[world.user_region],
            "device": np.array(DEVICES)[world.user_device],
            "language": np.array(LANGUAGES)[world.user_language],
            "signup_ts": pa.array(world.user_signup_ms, pa.int64()).cast(USERS.field("signup_ts").type),
            "consent_personalisation": world.consent_personalisation,
            "consent_training": world.consent_training,
        },
        schema=USERS,
    )


def items_table(world: World) -> pa.Table:
    return pa.table(
        {
            "item_id": world.item_ids,
            "author_id": world.creator_ids[world.item_creator],
            "duration_ms": world.item_duration_ms.astype(np.int32),
            "upload_ts": pa.array(world.item_upload_ms, pa.int64()).cast(ITEMS.field("upload_ts").type),
            "hashtags": pa.array(world.item_hashtags, pa.list_(pa.string())),
            "language": np.array(LANGUAGES)[world.item_language],
            "region": np.array(REGIONS)[world.item_region],
        },
        schema=ITEMS,
    )
