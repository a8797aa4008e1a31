"""The streaming joiner: served rows + actions -> one labelled example per served row, as a state machine.

Engine-independent: a runner feeds one `Joiner` per partition (served rows and actions are both
partitioned by user, so a user's rows and actions meet in one joiner) with decoded records and
watermarks, writes what each call returns, and commits the state changes with its input offsets.

Semantics (W = `window_ms`, G = `grace_ms`, event time throughout):

- A served row opens a window [ts, ts + W]. Actions on its (request_id, item_id) with ts in the
  window merge into it (booleans OR-ed, watch_ms the maximum; an action_id seen before is a
  duplicate, counted once). When the watermark reaches ts + W the window closes and the row's one
  `Example` is emitted, a negative (all labels false) when no action came.
- An action that comes before its served row waits until the watermark reaches action.ts + W (when
  any row it could join has closed); unmatched then, it becomes a dead letter "no served row". One
  that arrives when that moment has already passed and finds no row is "too late".
- An action whose ts lies outside its row's window is dead-lettered "outside window".
- A closed row is kept G more so a late action (its ts inside the window, arriving after the close)
  finds it: policy "drop" dead-letters it "late"; policy "correct" merges it and, when the labels
  change, emits a corrective `Example` (same served row, same inputs, `correction=True`).
- A row whose user did not consent to training at serving time, or revoked consent since, is never
  emitted (counted as non-consenting). Revoking drops the inputs of the user's pending and closed rows
  at once (the keys stay, so the user's later actions are absorbed, never dead-lettered); rows served
  up to a later re-grant stay excluded.
- A served row that arrives behind the watermark (its window already over) is joined with whatever
  actions are still buffered and emitted at once (counted `served_late`). A served row or action
  seen again after its row left the grace period cannot be recognised as a repeat; with G < W, an
  action arriving after its row's grace but before action.ts + W is reported "no served row".
- Consent: only revokes are stored (and a re-grant after one), by event time; the latest wins.

"The watermark reaches t" means watermark >= t: a watermark promises no more events at or before it.
Outputs depend on where the runner puts watermarks among the records; a replay re-emits the same
outputs when it feeds the same watermarks at the same places (the runner commits them with the
offsets, or derives them from the records alone).

State is key/value entries with change tracking (`drain_changes`) and `Joiner.restore` rebuilds a
joiner from them, so a runner can commit offsets, state changes and outputs in one transaction.
Every output order is a pure function of the inputs and their order: timers fire by (deadline,
arrival sequence) and the sequence counter is part of the state, so a restored joiner re-emits
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from gpurec.errors import InvalidInput
from gpurec.preprocess.features import FINISH_DENOMINATOR, FINISH_NUMERATOR
from gpurec.stream.joiner_state import (
    CONSENT_PREFIX,
    EARLY_PREFIX,
    META_KEY,
    ROW_PREFIX,
    ConsentState,
    EarlyAction,
    JoinerMeta,
    RowState,
    decode_entries,
    encode_state,
    pack_key,
    pack_user,
)
from gpurec.stream.records import INT64_MIN, Action, DeadLetter, Example, ServedRow, encode

LatePolicy = Literal["drop", "correct"]
Output = Example | DeadLetter

NO_SERVED_ROW: Final = "no served row"
OUTSIDE_WINDOW: Final = "outside window"
LATE: Final = "late"
TOO_LATE: Final = "too late"

COUNTERS: Final[tuple[str, ...]] = (
    "served",  # served rows received
    "served_duplicates",  # a served row whose (request_id, item_id) is already held
    "served_late",  # served rows that arrived after their window had closed (emitted at once)
    "actions",  # action events received
    "joined",  # actions merged into an open window
    "early",  # actions buffered because their served row had not arrived yet
    "duplicates",  # repeated action_ids, counted once
    "late",  # actions that found their row closed but still in grace
    "corrections",  # corrective examples emitted (policy "correct")
    "examples",  # examples emitted at window close (corrections not included)
    "positives",  # of those, examples with at least one action
    "negatives",  # of those, examples with no action (all labels false)
    "non_consenting",  # served rows never emitted because of training consent
    "non_consenting_actions",  # actions of those rows or of revoked users, dropped
    "consent_changes",  # on_consent calls
)


@dataclass(frozen=True)
class JoinerConfig:
    """Window W and grace G in event-time milliseconds, and what a late action does."""

    window_ms: int
    grace_ms: int
    late_policy: LatePolicy = "drop"

    def __post_init__(self) -> None:
        if not isinstance(self.window_ms, int) or self.window_ms < 0:
            raise InvalidInput(f"window_ms must be an integer >= 0, got {self.window_ms!r}")
        if not isinstance(self.grace_ms, int) or self.grace_ms < 0:
            raise InvalidInput(f"grace_ms must be an integer >= 0, got {self.grace_ms!r}")
        if self.late_policy not in get_args(LatePolicy):
            raise InvalidInput(f"late_policy must be 'drop' or 'correct', got {self.late_policy!r}")


# Timer kinds. A timer is (deadline, seq, kind, key, row) and fires when the watermark reaches its
# deadline; (deadline, seq) is unique, so the key and row are never compared.
_CLOSE: Final = 0
_EXPIRE: Final = 1  # only rows closed out of deadline order; the others wait in the grace queue
_EARLY: Final = 2

Key = bytes  # pack_key(request_id, item_id): hashed once, never tracked by the garbage collector
Timer = tuple[int, int, int, Key, RowState | None]


class Joiner:
    """One partition's join of served rows and actions; see the module docstring for the rules.

    A row is closed exactly when ts_ms + W <= the watermark: every timer up to the watermark has
    fired by the time the next input is handled, so "closed" needs no state of its own. Each row has
    exactly one close timer and one end of grace, and leaves `_rows` only at the latter.
    """

    def __init__(self, config: JoinerConfig) -> None:
        self.config = config
        self._window = config.window_ms
        self._grace = config.grace_ms
        self._correct = config.late_policy == "correct"
        self._watermark = INT64_MIN
        self._seq = 0  # arrival sequence: orders timers with equal deadlines
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._dead_letters: dict[str, int] = {}
        self._rows: dict[Key, RowState] = {}
        self._early: dict[Key, list[EarlyAction]] = {}
        self._consent: dict[int, ConsentState] = {}
        # Forgotten users: excluded like a revoke, but kept in memory only (their stored consent entry is
        # deleted); after a restart their new rows carry consent_training=False anyway (no profile).
        self._forgotten: set[int] = set()
        self._timers: list[Timer] = []
        # Rows closed in deadline order end their grace in that order: a queue, not the heap.
        self._grace_queue: deque[tuple[int, Key]] = deque()
        # Entries changed since the last drain: key -> the value now, None when deleted.
        self._dirty_rows: dict[Key, RowState | None] = {}
        self._dirty_early: dict[Key, list[EarlyAction] | None] = {}
        self._dirty_consent: dict[int, ConsentState | None] = {}
        self._meta_dirty = True

    @property
    def watermark(self) -> int:
        """The last watermark applied (INT64_MIN before the first)."""
        return self._watermark

    # ---- inputs -------------------------------------------------------------------------------

    def on_served(self, row: ServedRow) -> list[Output]:
        """A served row opens its window; actions that came first join it now."""
        counts = self._counts
        counts["served"] += 1
        self._meta_dirty = True
        key = pack_key(row.request_id, row.item_id)
        if key in self._rows:
            counts["served_duplicates"] += 1
            return []
        self._seq = seq = self._seq + 1
        if row.consent_training and not ((self._consent or self._forgotten) and self._excluded(row.user_id, row.ts_ms)):
            state = RowState(seq, row.ts_ms, row.user_id, row)
        else:
            state = RowState(seq, row.ts_ms, row.user_id, None)
            counts["non_consenting"] += 1
        self._rows[key] = self._dirty_rows[key] = state
        deadline = row.ts_ms + self._window
        heapq.heappush(self._timers, (deadline, seq, _CLOSE, key, state))
        out: list[Output] = []
        if self._early:
            early = self._early.pop(key, None)
            if early is not None:
                self._dirty_early[key] = None
                for waiting in early:
                    out.extend(self._apply(key, state, waiting.action, False))
        if deadline <= self._watermark:
            counts["served_late"] += 1
            out.extend(self._fire())
        return out

    def on_action(self, action: Action) -> list[Output]:
        """An action merges into its row, waits for it, or becomes a dead letter (or a correction)."""
        counts = self._counts
        counts["actions"] += 1
        self._meta_dirty = True
        if (self._consent or self._forgotten) and self._excluded(action.user_id, action.ts_ms):
            counts["non_consenting_actions"] += 1
            return []
        key = pack_key(action.request_id, action.item_id)
        row = self._rows.get(key)
        if row is not None:
            return self._apply(key, row, action, row.ts_ms + self._window <= self._watermark)
        early = self._early.get(key)
        if early is not None:
            for waiting in early:
                if waiting.action.action_id == action.action_id:
                    counts["duplicates"] += 1
                    return []
        if self._watermark >= action.ts_ms + self._window:
            # Every row this action could join has closed already, and none of them is held.
            return [self._dead_letter(TOO_LATE, action)]
        self._seq = seq = self._seq + 1
        if early is None:
            early = self._early[key] = [EarlyAction(seq, action)]
        else:
            early.append(EarlyAction(seq, action))
        self._dirty_early[key] = early
        heapq.heappush(self._timers, (action.ts_ms + self._window, seq, _EARLY, key, None))
        counts["early"] += 1
        return []

    def on_consent(self, user_id: int, training: bool, ts_ms: int, forget: bool = False) -> list[Output]:
        """A consent change at event time ts_ms. A revoke strips the user's held rows at once; a
        forget does too, and deletes the user's stored consent entry."""
        self._counts["consent_changes"] += 1
        self._meta_dirty = True
        if forget:
            self._forgotten.add(user_id)
            self._strip(user_id)
            if self._consent.pop(user_id, None) is not None or user_id in self._dirty_consent:
                self._dirty_consent[user_id] = None
            return []
        current = self._consent.get(user_id)
        if training:
            # Only a re-grant after a revoke needs state; a grant older than the revoke changes nothing.
            if current is not None and not current.training and ts_ms >= current.ts_ms:
                self._consent[user_id] = self._dirty_consent[user_id] = ConsentState(True, ts_ms)
            return []
        if current is not None and current.training and current.ts_ms > ts_ms:
            return []  # an older revoke than the re-grant already recorded: rows up to the grant are out
        revoked_at = ts_ms if current is None else max(ts_ms, current.ts_ms)
        self._consent[user_id] = self._dirty_consent[user_id] = ConsentState(False, revoked_at)
        self._strip(user_id)
        return []

    def _strip(self, user_id: int) -> None:
        """Drop the inputs of a user's held rows and waiting actions (a revoke or a forget)."""
        # Revokes are rare: a scan of the held rows costs less than keeping an index by user.
        for key, row in self._rows.items():
            if row.user_id == user_id and row.served is not None:
                if row.ts_ms + self._window > self._watermark:
                    self._counts["non_consenting"] += 1  # pending: its example will never be emitted
                row.served = None
                self._dirty_rows[key] = row
        for key, waiting in list(self._early.items()):
            kept = [entry for entry in waiting if entry.action.user_id != user_id]
            if len(kept) == len(waiting):
                continue
            self._counts["non_consenting_actions"] += len(waiting) - len(kept)
            if kept:
                self._early[key] = self._dirty_early[key] = kept
            else:
                del self._early[key]
                self._dirty_early[key] = None

    def on_watermark(self, ts_ms: int) -> list[Output]:
        """Advance event time to ts_ms: close windows, end grace periods, expire waiting actions."""
        if ts_ms <= self._watermark:
            return []
        self._watermark = ts_ms
        self._meta_dirty = True
        return self._fire()

    # ---- the join -----------------------------------------------------------------------------

    def _excluded(self, user_id: int, ts_ms: int) -> bool:
        if user_id in self._forgotten:
            return True
        consent = self._consent.get(user_id)
        return consent is not None and (not consent.training or ts_ms <= consent.ts_ms)

    def _apply(self, key: Key, row: RowState, action: Action, closed: bool) -> list[Output]:
        counts = self._counts
        action_id = action.action_id
        if action_id in row.action_ids:
            counts["duplicates"] += 1
            return []
        row.action_ids = (*row.action_ids, action_id)
        self._dirty_rows[key] = row
        served = row.served
        if served is None:
            counts["non_consenting_actions"] += 1
            return []
        ts_ms = action.ts_ms
        if ts_ms < row.ts_ms or ts_ms > row.ts_ms + self._window:
            return [self._dead_letter(OUTSIDE_WINDOW, action)]
        if not closed:
            _merge(row, action)
            counts["joined"] += 1
            return []
        counts["late"] += 1
        if not self._correct:
            return [self._dead_letter(LATE, action)]
        before = _example(row, served, correction=True)
        _merge(row, action)
        after = _example(row, served, correction=True)
        if _same_labels(before, after):
            return []
        counts["corrections"] += 1
        return [after]

    def _fire(self) -> list[Output]:
        """Run every timer whose deadline the watermark has reached, in (deadline, seq) order."""
        out: list[Output] = []
        timers, grace_queue, watermark, rows = self._timers, self._grace_queue, self._watermark, self._rows
        grace, dirty_rows = self._grace, self._dirty_rows
        examples = positives = 0
        while timers and timers[0][0] <= watermark:
            deadline, seq, kind, key, row = heapq.heappop(timers)
            if kind == _EARLY:
                self._expire_early(key, seq, out)
            elif kind == _EXPIRE:
                del rows[key]
                dirty_rows[key] = None
            else:
                served = row.served
                if served is not None:
                    examples += 1
                    actions, watch_ms = row.actions, row.watch_ms
                    if actions:
                        positives += 1
                    finish = (
                        actions > 0 and watch_ms * FINISH_DENOMINATOR >= served.duration_ms * FINISH_NUMERATOR
                    )
                    # _example inlined: this loop runs once per served row.
                    out.append(Example(served, row.like, finish, row.share, row.comment, row.follow, row.skip,
                                       watch_ms, actions, False, row.last_action_ms))  # fmt: skip
                ends = deadline + grace
                if not grace_queue or grace_queue[-1][0] <= ends:
                    grace_queue.append((ends, key))
                else:  # a served row that came after the watermark closes out of order
                    heapq.heappush(timers, (ends, seq, _EXPIRE, key, None))
        while grace_queue and grace_queue[0][0] <= watermark:
            key = grace_queue.popleft()[1]
            del rows[key]
            dirty_rows[key] = None
        if examples:
            counts = self._counts
            counts["examples"] += examples
            counts["positives"] += positives
            counts["negatives"] += examples - positives
        return out

    def _expire_early(self, key: Key, seq: int, out: list[Output]) -> None:
        waiting = self._early.get(key)
        if waiting is None:
            return  # its row arrived and took it
        for index, entry in enumerate(waiting):
            if entry.seq == seq:
                del waiting[index]
                if waiting:
                    self._dirty_early[key] = waiting
                else:
                    del self._early[key]
                    self._dirty_early[key] = None
                out.append(self._dead_letter(NO_SERVED_ROW, entry.action))
                return

    def _dead_letter(self, reason: str, action: Action) -> DeadLetter:
        self._dead_letters[reason] = self._dead_letters.get(reason, 0) + 1
        return DeadLetter("action", reason, encode(action))

    # ---- stats and state ----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Counters since the state began (they survive restore), dead letters by reason, and sizes."""
        return {
            **self._counts,
            "dead_letters": dict(sorted(self._dead_letters.items())),
            "held_rows": len(self._rows),
            "waiting_actions": sum(len(waiting) for waiting in self._early.values()),
            "watermark": self._watermark,
        }

    def drain_changes(self) -> tuple[dict[bytes, bytes], set[bytes]]:
        """State entries changed since the last drain: (key -> new value, deleted keys)."""
        upserts: dict[bytes, bytes] = {}
        deletes: set[bytes] = set()
        for prefix, dirty in ((ROW_PREFIX, self._dirty_rows), (EARLY_PREFIX, self._dirty_early)):
            for key, value in dirty.items():
                if value is None:
                    deletes.add(prefix + key)
                else:
                    upserts[prefix + key] = encode_state(value)
            dirty.clear()
        for user_id, consent in self._dirty_consent.items():  # deleted only when the user is forgotten
            if consent is None:
                deletes.add(CONSENT_PREFIX + pack_user(user_id))
            else:
                upserts[CONSENT_PREFIX + pack_user(user_id)] = encode_state(consent)
        self._dirty_consent.clear()
        if self._meta_dirty:
            upserts[META_KEY] = encode_state(self._meta())
            self._meta_dirty = False
        return upserts, deletes

    def snapshot(self) -> dict[bytes, bytes]:
        """Every state entry as it is now (what the drained changes add up to)."""
        entries = {META_KEY: encode_state(self._meta())}
        entries.update((ROW_PREFIX + key, encode_state(row)) for key, row in self._rows.items())
        entries.update((EARLY_PREFIX + key, encode_state(waiting)) for key, waiting in self._early.items())
        entries.update((CONSENT_PREFIX + pack_user(u), encode_state(c)) for u, c in self._consent.items())
        return entries

    def _meta(self) -> JoinerMeta:
        config = self.config
        return JoinerMeta(
            config.window_ms,
            config.grace_ms,
            config.late_policy,
            self._watermark,
            self._seq,
            self._counts,
            self._dead_letters,
        )

    @classmethod
    def restore(
        cls, entries: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]], config: JoinerConfig
    ) -> Joiner:
        """A joiner continuing from committed state entries (none: a fresh joiner).

        The window must be the one the state was built with (actions already merged were judged by
        it); grace and late policy may change, and apply to what happens from now on.
        """
        joiner = cls(config)
        decoded = decode_entries(entries)
        if decoded is None:
            return joiner
        meta, rows, early, consent = decoded
        if meta.window_ms != config.window_ms:
            raise InvalidInput(
                f"joiner state was built with window_ms={meta.window_ms}, config says {config.window_ms}: "
                "start from empty state to change the window"
            )
        joiner._watermark, joiner._seq = meta.watermark, meta.seq
        joiner._counts.update(meta.counts)
        joiner._dead_letters = dict(meta.dead_letters)
        joiner._rows, joiner._early, joiner._consent = rows, early, consent
        in_grace = []
        for key, row in rows.items():
            close = row.ts_ms + config.window_ms
            if close <= meta.watermark:
                in_grace.append((close + config.grace_ms, row.seq, key))
            else:
                joiner._timers.append((close, row.seq, _CLOSE, key, row))
        for key, waiting in early.items():
            joiner._timers.extend(
                (w.action.ts_ms + config.window_ms, w.seq, _EARLY, key, None) for w in waiting
            )
        heapq.heapify(joiner._timers)
        joiner._grace_queue.extend((ends, key) for ends, _, key in sorted(in_grace))
        joiner._meta_dirty = meta.grace_ms != config.grace_ms or meta.late_policy != config.late_policy
        return joiner


def _merge(row: RowState, action: Action) -> None:
    row.actions += 1
    if action.like:
        row.like = True
    if action.share:
        row.share = True
    if action.comment:
        row.comment = True
    if action.follow:
        row.follow = True
    if action.skip:
        row.skip = True
    if action.watch_ms > row.watch_ms:
        row.watch_ms = action.watch_ms
    if action.ts_ms > row.last_action_ms:
        row.last_action_ms = action.ts_ms


def _example(row: RowState, served: ServedRow, correction: bool) -> Example:
    """The row's example; `finish` by batch preprocessing's integer rule (an action, watch >= 9/10)."""
    actions, watch_ms = row.actions, row.watch_ms
    finish = actions > 0 and watch_ms * FINISH_DENOMINATOR >= served.duration_ms * FINISH_NUMERATOR
    return Example(
        served, row.like, finish, row.share, row.comment, row.follow, row.skip, watch_ms, actions, correction, row.last_action_ms
    )


def _same_labels(a: Example, b: Example) -> bool:
    return (a.like, a.finish, a.share, a.comment, a.follow, a.skip, a.watch_ms) == (
        b.like,
        b.finish,
        b.share,
        b.comment,
        b.follow,
        b.skip,
        b.watch_ms,
    )


__all__ = [
    "COUNTERS",
    "LATE",
    "NO_SERVED_ROW",
    "OUTSIDE_WINDOW",
    "TOO_LATE",
    "Joiner",
    "JoinerConfig",
    "LatePolicy",
    "Output",
]
