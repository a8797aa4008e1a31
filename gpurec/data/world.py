"""A seeded short-video world that answers "what does user u do when shown items [..] at time t".

The batch log generator (`gpurec.data.simulator`) is one client of this class; later the online
loop drives it request by request (users ask for feeds, the ranker serves, the world reacts).

What makes the problem hard, and where it lives here:
- Zipf item popularity and a continuous stream of uploads whose appeal decays with age
  (`_item_weights`): yesterday's hits fade, new items need exposure to be learned.
- Users with latent topic interests that drift day by day (`interest_logits`), so a model
  trained on last week is stale.
- Creators, regions and languages: users prefer items in their language; creators make
  items of related topics.
- Position bias: engagement falls with depth in a session, independent of the item.
- Watch time and actions driven by user-item affinity plus noise, with a skip mode (a swipe
  away within a few seconds) and a replay tail (watch ratio above 1).

The true probabilities of like and finish are returned with every response (`Response.p_like`,
`Response.p_finish`): the oracle, written to its own file, never a feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gpurec.data.hashing import splitmix64
from gpurec.data.schema import MS_PER_DAY, day_start_ms

REGIONS = ("us", "br", "id", "in", "de", "jp")
REGION_P = (0.30, 0.20, 0.18, 0.17, 0.08, 0.07)
LANGUAGES = ("en", "pt", "id", "hi", "de", "ja")  # the main language of each region, same order
DEVICES = ("android", "ios", "web")
DEVICE_P = (0.62, 0.34, 0.04)
HOUR_WEIGHTS = np.array(  # diurnal activity (local evening peak), UTC hours for simplicity
    [
        2,
        1.2,
        0.8,
        0.6,
        0.5,
        0.6,
        1,
        1.6,
        2,
        2.2,
        2.4,
        2.6,
        3,
        2.8,
        2.6,
        2.6,
        2.8,
        3.2,
        3.8,
        4.4,
        4.8,
        4.6,
        3.8,
        2.8,
    ]
)


@dataclass(frozen=True)
class BehaviourConfig:
    """How users react. Defaults are calibrated (see `gpurec.data.calibration`)."""

    affinity_scale: float = 0.45  # weight of topic interest in affinity
    language_bonus: float = 0.4  # affinity bonus for items in the user's language
    position_decay: float = 0.12  # logit penalty per log(1 + position in session)
    skip_bias: float = 0.65  # logit of skipping at zero affinity
    skip_slope: float = 0.9
    watch_ratio_mu: float = -0.45  # log watch ratio of an engaged view at zero affinity
    watch_ratio_slope: float = 0.25
    watch_ratio_sigma: float = 0.55
    watch_ratio_duration_slope: float = 0.35  # longer videos are watched to a smaller fraction
    max_watch_ratio: float = 4.0  # replays
    like_bias: float = -4.5
    like_slope: float = 0.9
    share_bias: float = -6.8
    share_slope: float = 1.0
    comment_bias: float = -5.4
    comment_slope: float = 0.9
    follow_bias: float = -7.5
    follow_slope: float = 1.0


@dataclass(frozen=True)
class WorldConfig:
    """Size and dynamics of the world. Every field is a knob; defaults give the calibrated world."""

    users: int = 10_000
    items: int = 20_000
    days: int = 7
    seed: int = 0
    start_day: str = "2026-01-05"
    topics: int = 32
    creators_per_item: float = 0.1  # creators = items * this
    preexisting_items: float = 0.5  # share of the catalogue uploaded before the first day
    backfill_days: int = 30  # pre-existing items were uploaded over this many days before start
    zipf_exponent: float = 1.05  # item popularity ~ rank ** -exponent
    item_lifetime_days: float = 2.0  # freshness half-life-ish: appeal * exp(-age / lifetime)
    evergreen_floor: float = 0.08  # share of appeal that never decays
    interest_sharpness: float = 1.0  # scale of users' topic-interest logits (higher = narrower tastes)
    interest_drift: float = 0.25  # std of the daily random walk of interest logits (no published source)
    daily_active: float = 0.7  # chance a user is active on a given day
    impressions_per_day_median: float = 48.0
    impressions_per_day_sigma: float = 0.75
    session_budget_exponent: float = 1.6  # scroll budget ~ discrete power law (arXiv 2307.14059)
    max_session_budget: int = 80
    page_size: int = 6  # items served per feed request
    personalised_share: float = 0.6  # logging policy: share of slots picked by interest
    duration_median_s: float = 30.0
    duration_sigma: float = 0.9
    consent_personalisation: float = 0.95
    consent_training: float = 0.93
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)


@dataclass
class Response:
    """What users did with shown items (arrays aligned with the request)."""

    watch_ms: np.ndarray
    skip: np.ndarray
    like: np.ndarray
    share: np.ndarray
    comment: np.ndarray
    follow: np.ndarray
    p_like: np.ndarray
    p_finish: np.ndarray


def _sparse_ids(n: int, seed: int, kind: int) -> np.ndarray:
    """n distinct positive 63-bit ids that look like production ids (not 0..n-1)."""
    base = splitmix64(seed * 1_000_003 + kind)
    ids = np.array([splitmix64(base + i) >> 1 for i in range(n)], dtype=np.int64)
    if len(np.unique(ids)) != n:  # practically impossible; fail loudly rather than collide
        raise RuntimeError("id generator collision")
    return ids


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7) without scipy."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * erf)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """Users, creators and items with latent state; deterministic given `WorldConfig.seed`."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = c = config
        rng = np.random.default_rng([c.seed, 1])
        self.start_ms = day_start_ms(c.start_day)

        # Users: region, language (mostly the region's), device, consent, interests, activity.
        self.user_ids = _sparse_ids(c.users, c.seed, 1)
        self.user_region = rng.choice(len(REGIONS), size=c.users, p=REGION_P)
        foreign = rng.random(c.users) < 0.15
        self.user_language = np.where(foreign, 0, self.user_region)  # foreigners speak English
        self.user_device = rng.choice(len(DEVICES), size=c.users, p=DEVICE_P)
        self.user_signup_ms = self.start_ms - rng.integers(1, 720, size=c.users) * MS_PER_DAY // 2
        self.consent_personalisation = rng.random(c.users) < c.consent_personalisation
        self.consent_training = self.consent_personalisation & (
            rng.random(c.users) < c.consent_training / c.consent_personalisation
        )
        self._interest0 = c.interest_sharpness * rng.gumbel(size=(c.users, c.topics))
        self.user_activity = np.exp(
            np.log(c.impressions_per_day_median) + c.impressions_per_day_sigma * rng.standard_normal(c.users)
        )
        self.user_bias = 0.3 * rng.standard_normal(c.users)

        # Creators make items of a home topic and language; prolific creators follow a Zipf law.
        n_creators = max(1, int(c.items * c.creators_per_item))
        self.creator_ids = _sparse_ids(n_creators, c.seed, 2)
        creator_topic = rng.integers(0, c.topics, size=n_creators)
        creator_region = rng.choice(len(REGIONS), size=n_creators, p=REGION_P)
        productivity = 1.0 / np.arange(1, n_creators + 1) ** 0.8
        item_creator = rng.choice(n_creators, size=c.items, p=productivity / productivity.sum())

        # Items: topic (creator's home topic 70% of the time), popularity rank, quality, duration.
        self.item_ids = _sparse_ids(c.items, c.seed, 3)
        self.item_creator = item_creator
        self.item_topic = np.where(
            rng.random(c.items) < 0.7, creator_topic[item_creator], rng.integers(0, c.topics, size=c.items)
        )
        self.item_region = creator_region[item_creator]
        self.item_language = np.where(rng.random(c.items) < 0.2, 0, self.item_region)
        rank = rng.permutation(c.items) + 1
        self.item_appeal = rank.astype(np.float64) ** -c.zipf_exponent
        log_appeal = np.log(self.item_appeal)
        self.item_quality = 0.25 * (
            log_appeal - log_appeal.mean()
        ) / log_appeal.std() + 0.35 * rng.standard_normal(c.items)
        duration_s = np.exp(np.log(c.duration_median_s) + c.duration_sigma * rng.standard_normal(c.items))
        self.item_duration_ms = (np.clip(duration_s, 3.0, 1200.0) * 1000).astype(np.int64)
        pre = rng.random(c.items) < c.preexisting_items
        span_ms = np.where(pre, c.backfill_days, c.days) * MS_PER_DAY
        offset_ms = (rng.random(c.items) * span_ms).astype(np.int64)
        self.item_upload_ms = np.where(pre, self.start_ms - span_ms + offset_ms, self.start_ms + offset_ms)
        self.item_hashtags = self._hashtags(rng)

        self._drift_day = 0
        self._interest_logits = self._interest0.copy()

    def _hashtags(self, rng: np.random.Generator) -> list[list[str]]:
        """1-4 hashtags per item: mostly its topic's tags, sometimes a trending generic one."""
        c = self.config
        counts = rng.integers(1, 5, size=c.items)
        topic_tag = rng.integers(0, 12, size=(c.items, 4))
        generic = rng.random((c.items, 4)) < 0.2
        tags = []
        for i in range(c.items):
            tags.append(
                [
                    f"fyp{topic_tag[i, j]}" if generic[i, j] else f"t{self.item_topic[i]}_{topic_tag[i, j]}"
                    for j in range(counts[i])
                ]
            )
        return tags

    # ---- time -------------------------------------------------------------------------------

    def day_index(self, ts_ms: int) -> int:
        return int((ts_ms - self.start_ms) // MS_PER_DAY)

    def interest_logits(self, day: int) -> np.ndarray:
        """Users' topic-interest logits on `day`: a random walk from day 0, same for any call order."""
        if day < self._drift_day:
            self._drift_day, self._interest_logits = 0, self._interest0.copy()
        while self._drift_day < day:
            self._drift_day += 1
            step = np.random.default_rng([self.config.seed, 2, self._drift_day]).standard_normal(
                self._interest0.shape
            )
            self._interest_logits = self._interest_logits + self.config.interest_drift * step
        return self._interest_logits

    def interests(self, day: int) -> np.ndarray:
        logits = self.interest_logits(day)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def item_weights(self, ts_ms: int) -> np.ndarray:
        """Exposure appeal of each item at `ts_ms`: popularity x freshness, zero before upload."""
        c = self.config
        age_days = (ts_ms - self.item_upload_ms) / MS_PER_DAY
        fresh = c.evergreen_floor + (1 - c.evergreen_floor) * np.exp(
            -np.clip(age_days, 0, None) / c.item_lifetime_days
        )
        return np.where(age_days >= 0, self.item_appeal * fresh, 0.0)

    # ---- reactions ---------------------------------------------------------------------------

    def respond(
        self,
        users: np.ndarray,
        items: np.ndarray,
        day: int,
        session_position: np.ndarray,
        rng: np.random.Generator,
    ) -> Response:
        """Reactions of users[j] to items[j] (row indices, not ids) on `day`.

        `session_position` is how deep in the scrolling session the item was shown (position bias).
        """
        b = self.config.behaviour
        interest = self.interests(day)[users, self.item_topic[items]]
        affinity = (
            b.affinity_scale * np.log(interest * self.config.topics + 1e-3)
            + self.item_quality[items]
            + self.user_bias[users]
            + b.language_bonus * (self.user_language[users] == self.item_language[items])
        )
        position = b.position_decay * np.log1p(session_position)
        p_skip = _sigmoid(b.skip_bias - b.skip_slope * affinity + position)
        duration = self.item_duration_ms[items]
        mu = (
            b.watch_ratio_mu
            + b.watch_ratio_slope * affinity
            - b.watch_ratio_duration_slope * np.log(duration / (1000 * self.config.duration_median_s))
        )
        p_engaged_finish = 1.0 - _normal_cdf((math.log(0.9) - mu) / b.watch_ratio_sigma)
        p_like_engaged = _sigmoid(b.like_bias + b.like_slope * affinity - position)
        n = len(users)
        skip = rng.random(n) < p_skip
        ratio = np.minimum(np.exp(mu + b.watch_ratio_sigma * rng.standard_normal(n)), b.max_watch_ratio)
        # A skip is a swipe away after 0.3-3 s, always before 85% of the video (never a finish).
        skip_ms = np.minimum(rng.uniform(300, 3000, n), 0.85 * duration)
        watch = np.where(skip, skip_ms, ratio * duration).astype(np.int64)
        engaged = ~skip
        return Response(
            watch_ms=watch,
            skip=skip,
            like=engaged & (rng.random(n) < p_like_engaged),
            share=engaged & (rng.random(n) < _sigmoid(b.share_bias + b.share_slope * affinity - position)),
            comment=engaged
            & (rng.random(n) < _sigmoid(b.comment_bias + b.comment_slope * affinity - position)),
            follow=engaged & (rng.random(n) < _sigmoid(b.follow_bias + b.follow_slope * affinity - position)),
            p_like=((1 - p_skip) * p_like_engaged).astype(np.float32),
            p_finish=((1 - p_skip) * p_engaged_finish).astype(np.float32),
        )
