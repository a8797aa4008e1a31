"""The live simulation's behaviour model: the synthetic world's users reacting to a real feed.

`gpurec simulate` (`gpurec.client.simulate_run`) drives the feed with this; everything here is
in-process and deterministic given its random generators, so tests check it against `World`.

- Users: a sample of the world's users; a session picks one in proportion to their daily activity
  (`World.user_activity`, as the batch simulator's sessions per user).
- Sessions: a scroll budget from the batch simulator's discrete power law
  (`session_budget_exponent`, `max_session_budget`); the user asks the feed for `page_size` items
  at a time and scrolls through what the feed *actually showed*, until the budget runs out (items
  served but never reached are the joiner's negatives).
- Reactions: `World.respond` for the current simulated day, with the position in the session
  (position bias), so the live users are the world's users, not a second model of them.
- Time: an impression starts when the previous one was swiped away (its watch time plus a swipe gap,
  as in the batch simulator). Each viewed impression gives a watch event when the user swipes away,
  and one more event per like, share, comment or follow a little later (each with its own
  `action_id`); a small share of impressions reach the log late (an app that was offline).
- Uploads: the world's own upload times; an item exists from its `item_upload_ms`.
- Event time runs `speedup` times faster than wall time (`EventClock`).

Deliberate differences from the batch logs: no diurnal cycle and no daily-active draw. Sessions
arrive at the rate asked for in wall-clock time, so the load on the server stays what the caller
chose; a watch time of 0 ms is reported as 1 ms, so every event lies strictly after its impression.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpurec.data.pseudonym import Pseudonymizer
from gpurec.data.schema import MS_PER_DAY
from gpurec.data.simulator import items_table, users_table
from gpurec.data.world import Response, World, WorldConfig
from gpurec.errors import InvalidInput
from gpurec.stream.records import Action

SWIPE_GAP_MS = (200, 1500)  # between two impressions, as `gpurec.data.simulator.simulate_day` draws it
ENGAGEMENTS = ("like", "share", "comment", "follow")


@dataclass(frozen=True)
class LiveConfig:
    """When actions happen and reach the log (event-time milliseconds). No published source: chosen."""

    follow_up_median_ms: float = 1500.0
    """A like, share, comment or follow comes this long (median, lognormal) after the watch ends."""
    follow_up_sigma: float = 1.0
    late_share: float = 0.02
    """Share of impressions whose events reach the log late, all of them together (offline app)."""
    late_min_ms: int = 5 * 60_000
    late_max_ms: int = 30 * 60_000
    """Late events arrive this long after they happened (uniform); past the joiner's default
    out-of-order bound, so they meet closed windows."""

    def __post_init__(self) -> None:
        if not self.follow_up_median_ms > 0 or not self.follow_up_sigma >= 0:
            raise InvalidInput("follow_up_median_ms must be > 0 and follow_up_sigma >= 0")
        if not 0.0 <= self.late_share <= 1.0:
            raise InvalidInput(f"late_share must be in [0, 1], got {self.late_share}")
        if not 0 <= self.late_min_ms <= self.late_max_ms:
            raise InvalidInput(
                f"need 0 <= late_min_ms <= late_max_ms, got {self.late_min_ms}, {self.late_max_ms}"
            )


class EventClock:
    """Event time (epoch ms) from wall time: `start_ms` at creation, then `speedup` ms per wall ms."""

    def __init__(self, start_ms: int, speedup: float, wall: Callable[[], float] = time.monotonic) -> None:
        if not speedup > 0 or not math.isfinite(speedup):
            raise InvalidInput(f"speedup must be a positive number, got {speedup}")
        self.start_ms = int(start_ms)
        self.speedup = float(speedup)
        self._wall = wall
        self.wall_start = wall()

    def now_ms(self) -> int:
        return self.start_ms + int((self._wall() - self.wall_start) * 1000.0 * self.speedup)

    def wall_at(self, event_ms: int) -> float:
        """The wall-clock (monotonic) time at which event time reaches `event_ms`."""
        return self.wall_start + (event_ms - self.start_ms) / (1000.0 * self.speedup)

    def seconds_until(self, event_ms: int) -> float:
        return self.wall_at(event_ms) - self._wall()


@dataclass(frozen=True)
class Delivery:
    """One action event and the event time at which it reaches the log (>= its own ts_ms)."""

    deliver_ms: int
    action: Action


@dataclass(frozen=True)
class Page:
    """What one user did with one feed response: the impressions they reached, in order."""

    item_ids: np.ndarray  # viewed items (the first ones shown, up to the remaining budget)
    start_ms: np.ndarray  # when each impression started
    positions: np.ndarray  # position in the session (what `World.respond` was given)
    response: Response  # the world's reaction, aligned with item_ids
    deliveries: list[Delivery]
    end_ms: int  # when the user swiped past the last viewed item (the next request's time)
    unknown: int  # shown items the world does not know (not viewed)


class _DayCachedWorld(World):
    """`World` whose `interests(day)` is computed once per day instead of once per `respond` call.

    The batch simulator calls `respond` once a day for everyone; live it is called per page, and
    the softmax over all users x topics would dominate. Same values; a lock makes the day-by-day
    drift (which `World` advances in place) safe to reach from several threads.
    """

    def __init__(self, config: WorldConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._cached: dict[int, np.ndarray] = {}

    def interests(self, day: int) -> np.ndarray:
        with self._lock:
            cached = self._cached.get(day)
            if cached is None:
                cached = super().interests(day)
                if len(self._cached) >= 2:  # sessions straddle midnight: keep today and yesterday
                    self._cached.pop(min(self._cached))
                self._cached[day] = cached
            return cached


def budget_distribution(config: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Scroll budgets 1..max and their probabilities: the batch simulator's discrete power law."""
    values = np.arange(1, config.max_session_budget + 1)
    p = values.astype(np.float64) ** -config.session_budget_exponent
    return values, p / p.sum()


class LiveWorld:
    """The world seen by the live simulation: sampled users, the catalogue over time, reactions."""

    def __init__(
        self,
        config: WorldConfig,
        users: int,
        seed: int,
        live: LiveConfig | None = None,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        if not 1 <= users <= config.users:
            raise InvalidInput(f"users must be in 1..{config.users} (the world's users), got {users}")
        self.world: World = _DayCachedWorld(config)
        self.config = config
        self.live = live or LiveConfig()
        rng = np.random.default_rng([seed, 11])
        self.user_rows = np.sort(rng.choice(config.users, size=users, replace=False))
        activity = self.world.user_activity[self.user_rows]
        self.user_weights = activity / activity.sum()
        # The simulated app is the edge: with a key, the platform (requests, actions, the store)
        # gets pseudonyms of the world's raw ids, the same ones `gpurec generate` writes.
        self.platform_user_ids = (
            self.world.user_ids
            if pseudonymizer is None
            else pseudonymizer.pseudonymize(self.world.user_ids).to_numpy()
        )
        self.user_ids = self.platform_user_ids[self.user_rows]
        self._item_row = {int(item): row for row, item in enumerate(self.world.item_ids.tolist())}
        self._by_upload = np.argsort(self.world.item_upload_ms, kind="stable")
        self._upload_sorted = self.world.item_upload_ms[self._by_upload]
        self._items_table: pa.Table | None = None
        self.budgets, self.budget_p = budget_distribution(config)

    # ---- who, what, when ---------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def start_ms(self) -> int:
        return self.world.start_ms

    @property
    def end_ms(self) -> int:
        """The end of the world's upload process (no item is uploaded later)."""
        return self.world.start_ms + self.config.days * MS_PER_DAY

    def users_table(self) -> pa.Table:
        """The sampled users' profiles (region, language, device, consent): the USERS log's rows."""
        table = users_table(self.world).take(pa.array(self.user_rows))
        index = table.schema.get_field_index("user_id")
        return table.set_column(index, table.schema.field(index), pa.array(self.user_ids, pa.int64()))

    def items_table(self, rows: np.ndarray) -> pa.Table:
        """Rows of the ITEMS log for world item rows `rows`."""
        if self._items_table is None:
            self._items_table = items_table(self.world)
        return self._items_table.take(pa.array(np.asarray(rows, np.int64)))

    def uploaded(self, after_ms: int | None, until_ms: int) -> np.ndarray:
        """World item rows uploaded in (after_ms, until_ms] (all up to until_ms if after_ms is None),
        in upload order."""
        lo = 0 if after_ms is None else int(np.searchsorted(self._upload_sorted, after_ms, side="right"))
        hi = int(np.searchsorted(self._upload_sorted, until_ms, side="right"))
        return self._by_upload[lo:hi]

    def mean_requests_per_session(self) -> float:
        """Expected feed requests per session: ceil(budget / page_size) under the budget law."""
        pages = -(-self.budgets // self.page_size)
        return float((pages * self.budget_p).sum())

    def session_arrival_rate(self, requests_per_s: float) -> float:
        """Sessions per second that make `requests_per_s` feed requests per second on average."""
        return requests_per_s / self.mean_requests_per_session()

    def draw_budget(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.budgets, p=self.budget_p))

    def draw_user(
        self, rng: np.random.Generator, busy: set[int] | frozenset[int] = frozenset()
    ) -> int | None:
        """Index (into the sample) of the user who opens the next session, by activity, skipping
        users already in a session; None when every user is busy."""
        if not busy:
            return int(rng.choice(len(self.user_rows), p=self.user_weights))
        weights = self.user_weights.copy()
        weights[list(busy)] = 0.0
        total = weights.sum()
        if total <= 0:
            return None
        return int(rng.choice(len(self.user_rows), p=weights / total))

    # ---- one page of a session ---------------------------------------------------------------

    def view_page(
        self,
        user: int,
        request_id: int,
        shown: np.ndarray,
        budget_left: int,
        first_position: int,
        start_ms: int,
        rng: np.random.Generator,
        action_ids: Iterator[int],
    ) -> Page:
        """User `user` (index into the sample) scrolls through `shown` from `start_ms` on.

        They reach at most `budget_left` items; items the world does not know are passed over
        without a reaction (counted in `unknown`). Positions continue from `first_position`.
        """
        rows = np.array([self._item_row.get(int(i), -1) for i in np.asarray(shown).tolist()], np.int64)
        known = rows >= 0
        reached = np.flatnonzero(known)[: max(0, budget_left)]
        rows = rows[reached]
        item_ids = np.asarray(shown, np.int64)[reached]
        positions = first_position + np.arange(len(rows))
        user_row = int(self.user_rows[user])
        day = self.world.day_index(start_ms)
        response = self.world.respond(np.full(len(rows), user_row), rows, day, positions, rng)
        # Watch times of at least 1 ms, so that every event lies strictly after its impression.
        watched = np.maximum(response.watch_ms, 1)
        gaps = rng.integers(*SWIPE_GAP_MS, size=len(rows))
        spent = watched + gaps
        starts = start_ms + np.cumsum(spent) - spent
        end_ms = int(starts[-1] + spent[-1]) if len(rows) else start_ms
        deliveries = self._events(
            user_row, request_id, item_ids, starts + watched, watched, response, rng, action_ids
        )
        return Page(item_ids, starts, positions, response, deliveries, end_ms, int((~known).sum()))

    def _events(
        self,
        user_row: int,
        request_id: int,
        item_ids: np.ndarray,
        watch_end: np.ndarray,
        watched: np.ndarray,
        response: Response,
        rng: np.random.Generator,
        action_ids: Iterator[int],
    ) -> list[Delivery]:
        """Per impression: the watch event when the user swipes away, then one event per engagement.

        Follow-up events carry watch_ms 0 (the joiner keeps the maximum), so a consumer counting
        plays from events counts each play once.
        """
        live = self.live
        n = len(item_ids)
        user_id = int(self.platform_user_ids[user_row])
        late = rng.random(n) < live.late_share
        late_by = rng.integers(live.late_min_ms, live.late_max_ms + 1, size=n)
        flags = {name: getattr(response, name) for name in ENGAGEMENTS}
        follow_ups = {
            name: np.ceil(
                live.follow_up_median_ms * np.exp(live.follow_up_sigma * rng.standard_normal(n))
            ).astype(np.int64)
            for name in ENGAGEMENTS
        }
        out: list[Delivery] = []
        for j in range(n):
            extra = int(late_by[j]) if late[j] else 0
            ts = int(watch_end[j])
            watch = Action(
                next(action_ids), request_id, int(item_ids[j]), user_id, ts, int(watched[j]),
                False, False, False, False, bool(response.skip[j]),
            )  # fmt: skip
            out.append(Delivery(ts + extra, watch))
            for name in ENGAGEMENTS:
                if flags[name][j]:
                    at = ts + int(follow_ups[name][j])
                    action = Action(
                        next(action_ids), request_id, int(item_ids[j]), user_id, at, 0,
                        name == "like", name == "share", name == "comment", name == "follow", False,
                    )  # fmt: skip
                    out.append(Delivery(at + extra, action))
        return out


__all__ = [
    "ENGAGEMENTS",
    "SWIPE_GAP_MS",
    "Delivery",
    "EventClock",
    "LiveConfig",
    "LiveWorld",
    "Page",
    "budget_distribution",
]
