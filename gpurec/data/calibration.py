"""Statistics of generated logs against published short-video figures.

`gpurec generate --json` reports these for what it wrote; the default world is tuned to land
inside every `calibrated` range, and a test holds it there. Published figures come from
different platforms (VK, Tenrec/QQ, KuaiRec, KuaiRand) and do not all agree with one another;
where they cannot hold together in one world the target says so and is reported, not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Target:
    low: float
    high: float
    source: str
    calibrated: bool = True  # False: reported for reference, known not to hold together with the rest


TARGETS: dict[str, Target] = {
    "like_rate": Target(0.01, 0.03, "likes/impression: VK-LSVD 2.87%, Tenrec QK 2.06%"),
    "share_rate": Target(0.001, 0.0065, "shares/impression: VK 0.64%, Tenrec QK 0.23%"),
    "comment_rate": Target(0.005, 0.015, "comment opens/impression: VK 1.18%"),
    "follow_rate": Target(0.001, 0.002, "follows/impression: Tenrec QK 0.17%"),
    "valid_play_rate": Target(0.25, 0.50, "watch >= 7 s: Tenrec QK 24-29%, KuaiRand per-user median 48.6%"),
    "long_view_rate": Target(0.30, 0.38, "watch >= 18 s: 32-36%"),
    "finish_rate_user_median": Target(0.10, 0.30, "complete plays (>= 90%) per user, median: KuaiRand 15%"),
    "mean_watch_s": Target(15.0, 30.0, "mean watch time per impression: VK about 21 s"),
    # KuaiRec's watch ratios come from a fully observed lab matrix of 9.6 s videos; with the 50%
    # quick-skip rate that valid-play and long-view rates imply on 30 s videos they cannot hold,
    # so they are reported, not tuned.
    "watch_ratio_mean": Target(0.85, 0.95, "KuaiRec mean 0.85-0.95", calibrated=False),
    "watch_ratio_median": Target(0.65, 0.80, "KuaiRec median 0.72", calibrated=False),
    "replay_share": Target(0.02, 0.30, "share of plays with watch ratio > 1 (KuaiRec's replay tail)"),
    "duration_median_s": Target(9.6, 81.0, "video duration median: KuaiRec 9.6 s to KuaiRand about 81 s"),
    "duration_over_5min_share": Target(0.001, 0.05, "duration tail past 5 minutes"),
    "top20_item_exposure_share": Target(
        0.76, 1.0, "top 20% of items' exposure share: 76% in a curated pool, more in open catalogues"
    ),
    "impressions_per_user_day_median": Target(20.0, 70.0, "KuaiRec plays per user-day: median 42, mean 67"),
}


def compute_stats(
    watch_ms: np.ndarray,
    duration_ms: np.ndarray,
    like: np.ndarray,
    share: np.ndarray,
    comment: np.ndarray,
    follow: np.ndarray,
    user_index: np.ndarray,
    day_index: np.ndarray,
    item_index: np.ndarray,
    n_items: int,
    item_durations_ms: np.ndarray,
) -> dict[str, float]:
    """Impression-level arrays (aligned) in, the TARGETS statistics out."""
    ratio = watch_ms / duration_ms
    finish = ratio >= 0.9
    _, user_inverse = np.unique(user_index, return_inverse=True)
    per_user_finish = np.bincount(user_inverse, weights=finish) / np.bincount(user_inverse)
    user_day = np.unique(user_index.astype(np.int64) * 100_000 + day_index, return_counts=True)[1]
    exposures = np.sort(np.bincount(item_index, minlength=n_items))[::-1]
    top = max(1, round(0.2 * n_items))
    return {
        "like_rate": float(like.mean()),
        "share_rate": float(share.mean()),
        "comment_rate": float(comment.mean()),
        "follow_rate": float(follow.mean()),
        "valid_play_rate": float((watch_ms >= 7_000).mean()),
        "long_view_rate": float((watch_ms >= 18_000).mean()),
        "finish_rate_user_median": float(np.median(per_user_finish)),
        "mean_watch_s": float(watch_ms.mean() / 1000),
        "watch_ratio_mean": float(ratio.mean()),
        "watch_ratio_median": float(np.median(ratio)),
        "replay_share": float((ratio > 1).mean()),
        "duration_median_s": float(np.median(item_durations_ms) / 1000),
        "duration_over_5min_share": float((item_durations_ms > 300_000).mean()),
        "top20_item_exposure_share": float(exposures[:top].sum() / max(1, exposures.sum())),
        "impressions_per_user_day_median": float(np.median(user_day)),
    }


def report(stats: dict[str, float]) -> dict[str, dict]:
    """Each statistic with its target range, source and whether it lands inside."""
    out = {}
    for name, value in stats.items():
        t = TARGETS[name]
        out[name] = {
            "value": round(value, 6),
            "target": [t.low, t.high],
            "in_range": bool(t.low <= value <= t.high),
            "calibrated": t.calibrated,
            "source": t.source,
        }
    return out
