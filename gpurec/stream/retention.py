"""How long each event-log topic keeps its records: the defaults, defined once for every stage.

Retention goes by event time (see `gpurec.stream.log`): a record older than now - window is
deleted. Every stage that creates a topic passes `default_retention_ms(log, topic)` to
`create_topic` (the local log; see there for Kafka), and
`gpurec retention` applies the windows of a workspace's `[retention.topics]` table (these defaults
where it names none) to topics that already exist. Windows, in days of event time:

- served, actions: 7. The joiner needs a served row for window + grace (20 minutes by default)
  and a restarted joiner or online trainer replays from its committed offsets; a week covers an
  outage of several days. These records are the finest-grained trace of what a person watched
  (served rows carry the model's inputs), so nothing keeps them longer.
- examples: 7. Consumed by the online trainer within seconds; a week lets a trainer restored
  from a checkpoint of up to a week ago replay what it missed.
- joiner.dead_letter, trainer.dead_letter: 14. Time for someone to look at a refused record and
  fix its producer; they hold the refused record's bytes, personal data like the rest.
- consent: 730, not compacted. An audit trail: it must outlive every record whose processing it
  governed (the longest data window, raw logs, is 90 days) so a past decision can be shown to
  have had consent, and `gpurec export-user` returns the history, which compaction would lose.
  `gpurec forget` removes a forgotten user's records from it regardless.
- sync: 1. Only names of parameter-delta files, no personal data; a server that falls behind
  reloads from the newest snapshot, not from this topic.
- items, joiner.ticks: kept (None). The item catalogue (what the candidate source rebuilds from,
  no personal data) and the joiner's compacted watermark ticks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from gpurec.data.schema import MS_PER_DAY

if TYPE_CHECKING:
    from gpurec.stream.log import EventLog


# Topic names as the stages spell them (stream cannot import the sync and serve stages that own
# some of them; tests/test_retention.py checks that these names match theirs).
TOPIC_RETENTION_DAYS: Final[Mapping[str, float | None]] = {
    "served": 7,
    "actions": 7,
    "examples": 7,
    "joiner.dead_letter": 14,
    "trainer.dead_letter": 14,
    "consent": 730,
    "sync": 1,
    "items": None,
    "joiner.ticks": None,
}


def days_to_ms(days: float | None) -> int | None:
    """A window in days as whole milliseconds (None: keep forever)."""
    return None if days is None else max(1, round(days * MS_PER_DAY))


def default_retention_ms(log: EventLog, topic: str) -> int | None:
    """The retention a stage creates `topic` with: the default window where the backend measures it
    in event time (the local log), None (keep) on a broker that measures it against its wall clock
    (Kafka). A simulated world's event time runs months behind the wall clock, so a broker would
    delete its records as they arrive; there `gpurec retention` puts the windows on, once the event
    time is the wall clock's."""
    return retention_ms(topic) if log.retention_clock == "event" else None


def retention_ms(topic: str, windows: Mapping[str, float | None] | None = None) -> int | None:
    """The retention of `topic` in ms: `windows` (a workspace's configured days) first, then the
    default; None (keep forever) for a topic neither names."""
    if windows is not None and topic in windows:
        return days_to_ms(windows[topic])
    return days_to_ms(TOPIC_RETENTION_DAYS.get(topic))


__all__ = ["MS_PER_DAY", "TOPIC_RETENTION_DAYS", "days_to_ms", "default_retention_ms", "retention_ms"]
