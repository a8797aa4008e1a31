"""The streaming joiner's state machine, its records' wire format and the watermark helper (pure Python)."""

from __future__ import annotations

import itertools

import msgspec
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurec.errors import InvalidInput
from gpurec.preprocess.features import FINISH_DENOMINATOR, FINISH_NUMERATOR, label_exprs
from gpurec.stream.joiner import LATE, NO_SERVED_ROW, OUTSIDE_WINDOW, TOO_LATE, Joiner, JoinerConfig
from gpurec.stream.joiner_state import decode_entries
from gpurec.stream.records import (
    INT64_MAX,
    Action,
    ConsentChange,
    DeadLetter,
    Example,
    ModelInputs,
    ServedRow,
    decode,
    encode,
    encode_inputs,
)
from gpurec.stream.watermark import WatermarkTracker

W, G = 1_000, 500
T0 = 1_760_000_000_000
_ids = itertools.count(1)


def served(
    request: int = 1,
    item: int = 10,
    user: int = 7,
    ts: int = T0,
    *,
    consent: bool = True,
    duration: int = 10_000,
) -> ServedRow:
    inputs = ModelInputs(
        dense=(0.25, float(item), -1.5), sparse={"item_id": (item * 31,), "hashtags": (3, -4, INT64_MAX)}
    )
    return ServedRow(request, item, user, ts, 0, "v1", duration, consent, encode_inputs(inputs))


def action(
    request: int = 1,
    item: int = 10,
    user: int = 7,
    ts: int = T0 + 100,
    *,
    action_id: int | None = None,
    watch: int = 0,
    like: bool = False,
    share: bool = False,
    skip: bool = False,
) -> Action:
    action_id = next(_ids) if action_id is None else action_id
    return Action(action_id, request, item, user, ts, watch, like, share, False, False, skip)


def joiner(policy: str = "drop") -> Joiner:
    return Joiner(JoinerConfig(window_ms=W, grace_ms=G, late_policy=policy))


def examples(outputs: list) -> list[Example]:
    assert all(isinstance(o, Example) for o in outputs), outputs
    return outputs


def labels(example: Example) -> dict[str, object]:
    return {
        name: getattr(example, name) for name in ("like", "finish", "share", "skip", "watch_ms", "actions")
    }


def reasons(outputs: list) -> list[str]:
    assert all(isinstance(o, DeadLetter) for o in outputs), outputs
    return [o.reason for o in outputs]


def test_action_in_window_joins_and_example_waits_for_the_close():
    j, row = joiner(), served()
    assert j.on_served(row) == []
    assert j.on_action(action(like=True, watch=9_000)) == []
    assert j.on_watermark(T0 + W - 1) == []
    [example] = examples(j.on_watermark(T0 + W))
    assert example.served is row and encode(example.served) == encode(row)
    assert labels(example) == dict(like=True, finish=True, share=False, skip=False, watch_ms=9_000, actions=1)
    assert not example.correction
    stats = j.stats()
    assert (stats["examples"], stats["positives"], stats["negatives"], stats["joined"]) == (1, 1, 0, 1)
    assert stats["held_rows"] == 1  # kept in grace
    j.on_watermark(T0 + W + G)
    assert j.stats()["held_rows"] == 0


def test_row_without_actions_is_a_negative_at_close():
    j = joiner()
    j.on_served(served())
    [example] = examples(j.on_watermark(T0 + W + 5))
    assert labels(example) == dict(like=False, finish=False, share=False, skip=False, watch_ms=0, actions=0)
    assert j.stats()["negatives"] == 1


def test_finish_uses_the_batch_integer_rule():
    duration = 10_000
    threshold = -(-duration * FINISH_NUMERATOR // FINISH_DENOMINATOR)  # smallest watch that finishes
    for watch, finished in ((threshold, True), (threshold - 1, False)):
        j = joiner()
        j.on_served(served(duration=duration))
        j.on_action(action(watch=watch))
        [example] = examples(j.on_watermark(T0 + W))
        assert example.finish is finished
    # An action with no watch time finishes a zero-length item; no action never finishes.
    j = joiner()
    j.on_served(served(request=1, duration=0))
    j.on_served(served(request=2, duration=0))
    j.on_action(action(request=1, watch=0))
    assert [e.finish for e in examples(j.on_watermark(T0 + W))] == [True, False]


def test_labels_match_batch_preprocessing():
    """The same impressions through batch preprocessing's label expressions and through the joiner."""
    cases = [  # (duration_ms, watch_ms or None for no action, like)
        (10_000, 9_000, True),
        (10_000, 8_999, False),
        (7, 7, False),
        (7, 6, True),
        (0, 0, False),
        (30_000, None, None),
        (2**31 - 1, 2**31 - 1, False),  # int32 extremes: the products need 64-bit integers
    ]
    frame = pl.DataFrame(
        {
            "duration_ms": [c[0] for c in cases],
            "watch_ms": [c[1] for c in cases],
            "like": [c[2] for c in cases],
        },
        schema={"duration_ms": pl.Int32, "watch_ms": pl.Int32, "like": pl.Boolean},
    ).with_columns(label_exprs())
    j = joiner()
    for request, (duration, watch, like) in enumerate(cases):
        j.on_served(served(request=request, duration=duration))
        if watch is not None:
            j.on_action(action(request=request, watch=watch, like=like))
    out = examples(j.on_watermark(T0 + W))
    assert [float(e.like) for e in out] == frame["like"].to_list()
    assert [float(e.finish) for e in out] == frame["finish"].to_list()


def test_window_edges_include_ts_plus_w_and_reject_outside():
    j = joiner()
    j.on_served(served())
    assert j.on_action(action(ts=T0 + W, like=True)) == []
    assert reasons(j.on_action(action(ts=T0 + W + 1, share=True))) == [OUTSIDE_WINDOW]
    assert reasons(j.on_action(action(ts=T0 - 1, skip=True))) == [OUTSIDE_WINDOW]
    [example] = examples(j.on_watermark(T0 + W))
    assert (example.like, example.share, example.skip, example.actions) == (True, False, False, 1)
    assert j.stats()["dead_letters"] == {OUTSIDE_WINDOW: 2}


def test_several_actions_merge_in_any_order():
    acts = [action(watch=3_000), action(like=True, watch=1_000), action(share=True, skip=True)]
    results = set()
    for order in itertools.permutations(acts):
        j = joiner()
        j.on_served(served())
        for a in order:
            j.on_action(a)
        [example] = examples(j.on_watermark(T0 + W))
        results.add(encode(example))
    [only] = results
    example = decode(only, Example)
    assert labels(example) == dict(like=True, finish=False, share=True, skip=True, watch_ms=3_000, actions=3)


def test_duplicate_action_counts_once_whether_pending_waiting_or_late():
    j = joiner("correct")
    early = action(request=2, like=True)
    j.on_action(early)
    j.on_action(early)  # waiting for its served row
    j.on_served(served(request=2))
    j.on_action(early)  # now merged into the row
    j.on_served(served(request=1))
    first = action(request=1, watch=500)
    j.on_action(first)
    j.on_action(first)
    out = examples(j.on_watermark(T0 + W))
    assert [e.actions for e in out] == [1, 1]
    late = action(request=1, like=True)
    [correction] = examples(j.on_action(late))
    assert j.on_action(late) == []  # the same late event again: no second correction
    assert correction.correction and correction.like
    stats = j.stats()
    assert (stats["duplicates"], stats["actions"], stats["corrections"], stats["late"]) == (4, 7, 1, 1)


def test_action_before_its_served_row_joins_when_the_row_comes():
    j = joiner()
    assert j.on_action(action(ts=T0 + 50, like=True)) == []
    assert j.stats()["waiting_actions"] == 1
    j.on_watermark(T0 + 10)
    assert j.on_served(served(ts=T0)) == []
    [example] = examples(j.on_watermark(T0 + W))
    assert example.like and example.actions == 1
    assert j.stats()["early"] == 1 and j.stats()["waiting_actions"] == 0


def test_unmatched_action_is_dead_lettered_when_its_window_has_passed():
    j = joiner()
    orphan = action(request=99, ts=T0 + 200)
    j.on_action(orphan)
    assert j.on_watermark(T0 + 200 + W - 1) == []
    [letter] = j.on_watermark(T0 + 200 + W)
    assert (letter.reason, letter.source) == (NO_SERVED_ROW, "action")
    assert decode(letter.record, Action) == orphan
    assert j.stats()["dead_letters"] == {NO_SERVED_ROW: 1}


@pytest.mark.parametrize("policy", ["drop", "correct"])
def test_late_actions_follow_the_policy_and_grace(policy):
    j = joiner(policy)
    row = served()
    j.on_served(row)
    j.on_action(action(watch=100))
    [first] = examples(j.on_watermark(T0 + W))
    out = j.on_action(action(ts=T0 + 300, like=True, watch=9_500))
    if policy == "drop":
        assert reasons(out) == [LATE]
    else:
        [fixed] = examples(out)
        assert fixed.correction and fixed.served == row and fixed.served.inputs == first.served.inputs
        assert encode(fixed.served) == encode(first.served)
        assert (fixed.like, fixed.finish, fixed.watch_ms, fixed.actions) == (True, True, 9_500, 2)
        assert j.on_action(action(ts=T0 + 400, watch=50)) == []  # labels unchanged: no correction
    assert j.stats()["late"] == (1 if policy == "drop" else 2)
    j.on_watermark(T0 + W + G)  # grace over: the row is gone
    assert reasons(j.on_action(action(ts=T0 + 500, like=True))) == [TOO_LATE]
    assert j.stats()["examples"] == 1


def test_served_row_behind_the_watermark_is_emitted_at_once():
    j = joiner()
    j.on_action(action(ts=T0 + 900, like=True))
    j.on_watermark(T0 + W + 100)
    [example] = examples(j.on_served(served(ts=T0)))
    assert example.like and j.stats()["served_late"] == 1


def test_repeated_served_row_is_held_once():
    j = joiner()
    j.on_served(served())
    j.on_served(served())
    assert len(j.on_watermark(T0 + W)) == 1 and j.stats()["served_duplicates"] == 1


def served_rows_kept(j: Joiner) -> list[int]:
    """User ids of the served rows (with their inputs) in the joiner's state entries."""
    _, rows, _, _ = decode_entries(j.snapshot())
    return sorted(row.served.user_id for row in rows.values() if row.served is not None)


def test_users_without_consent_at_serving_are_never_emitted():
    j = joiner("correct")
    j.on_action(action(request=1, user=7, like=True))  # waiting, then absorbed by the excluded row
    j.on_served(served(request=1, user=7, consent=False))
    j.on_served(served(request=2, user=8))
    j.on_action(action(request=1, user=7, like=True))
    [example] = examples(j.on_watermark(T0 + W))
    assert example.served.user_id == 8
    assert j.on_action(action(request=1, user=7, ts=T0 + 10)) == []  # late, still never a correction
    stats = j.stats()
    assert (stats["non_consenting"], stats["non_consenting_actions"], stats["dead_letters"]) == (1, 3, {})
    assert served_rows_kept(j) == [8]  # no served row (inputs) of user 7 is kept


def test_revoked_consent_stops_pending_and_future_examples_until_a_regrant():
    j = joiner("correct")
    j.on_served(served(request=1, user=7, ts=T0))
    j.on_served(served(request=2, user=8, ts=T0))
    j.on_action(action(request=3, user=7, ts=T0 + 20))  # waiting for a row: dropped by the revoke
    assert j.on_consent(7, False, T0 + 50) == []
    assert served_rows_kept(j) == [8]  # the revoked user's inputs are gone from the state at once
    j.on_served(served(request=3, user=7, ts=T0 + 10))  # consent read before the revoke: still excluded
    j.on_action(action(request=1, user=7, like=True))
    out = examples(j.on_watermark(T0 + W + 10))
    assert [e.served.user_id for e in out] == [8]
    j.on_consent(7, True, T0 + 2_000)
    j.on_served(served(request=4, user=7, ts=T0 + 1_500))  # served before the re-grant: excluded
    j.on_served(served(request=5, user=7, ts=T0 + 2_500))
    out = examples(j.on_watermark(T0 + 2_500 + W))
    assert [e.served.request_id for e in out] == [5]
    stats = j.stats()
    assert stats["non_consenting"] == 3 and stats["dead_letters"] == {}
    assert stats["non_consenting_actions"] == 2


def test_revoke_strips_rows_in_grace_so_no_correction_follows():
    j = joiner("correct")
    j.on_served(served(user=7))
    examples(j.on_watermark(T0 + W))
    j.on_consent(7, False, T0 + W + 1)
    assert j.on_action(action(user=7, like=True)) == []
    assert j.stats()["corrections"] == 0


def test_same_inputs_give_identical_outputs():
    def run() -> list[bytes]:
        j = joiner("correct")
        out = []
        for request in range(20):
            out += j.on_served(served(request=request, user=request % 3, ts=T0 + request * 37))
            out += j.on_action(
                action(
                    request=request,
                    user=request % 3,
                    ts=T0 + request * 37 + 5,
                    action_id=request,
                    like=request % 2 == 0,
                )
            )
            out += j.on_watermark(T0 + request * 80)
        out += j.on_watermark(T0 + 10 * W)
        return [encode(o) for o in out]

    assert run() == run() and len(run()) == 20


# ---- state round trip --------------------------------------------------------------------------

USERS = 3


@st.composite
def events(draw):
    kind = draw(st.sampled_from(["served", "served", "action", "action", "action", "advance", "consent"]))
    request, item = draw(st.integers(0, 5)), draw(st.integers(0, 2))
    user = request % USERS
    # Mostly on a 100 ms grid, so deadlines, window edges and watermarks often coincide exactly.
    ts = draw(st.integers(0, 30).map(lambda k: 100 * k) | st.integers(0, 3_000))
    if kind == "served":
        return (
            "served",
            served(
                request, item, user, ts, consent=draw(st.booleans()) or draw(st.booleans()), duration=1_000
            ),
        )
    if kind == "action":
        flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans()))
        return (
            "action",
            Action(draw(st.integers(0, 30)), request, item, user, ts, draw(st.integers(0, 1_200)), *flags),
        )
    if kind == "consent":
        return ("consent", (user, draw(st.booleans()), ts))
    # The watermark only moves forward: by steps on the grid, so it often lands exactly on deadlines.
    return ("advance", draw(st.sampled_from([0, 100, 100, 200, 300, 500])))


def feed(j: Joiner, event) -> list[bytes]:
    kind, value = event
    if kind == "served":
        out = j.on_served(value)
    elif kind == "action":
        out = j.on_action(value)
    elif kind == "consent":
        out = j.on_consent(*value)
    elif kind == "advance":
        out = j.on_watermark(max(j.watermark, 0) + value)
    else:
        out = j.on_watermark(value)
    return [encode(o) for o in out]


@settings(max_examples=200, deadline=None)
@given(
    # Long enough streams that rows are open, closing and in grace at the commit points.
    stream=st.lists(events(), min_size=30, max_size=120),
    drains=st.lists(st.booleans(), min_size=121, max_size=121),
    cut=st.integers(0, 121),
    policy=st.sampled_from(["drop", "correct"]),
)
def test_restored_joiner_continues_exactly_like_an_uninterrupted_one(stream, drains, cut, policy):
    stream = [*stream, ("watermark", 10_000)]  # flush everything at the end
    config = JoinerConfig(window_ms=400, grace_ms=300, late_policy=policy)
    reference = Joiner(config)
    expected = [feed(reference, event) for event in stream]

    # A runner: commits (state changes, outputs) at drain points; crashes at `cut`, losing what
    # it did since the last commit, restarts from the committed entries and replays from there.
    store: dict[bytes, bytes] = {}
    committed_at, j = 0, Joiner(config)
    for index, event in enumerate(stream[: min(cut, len(stream))]):
        assert feed(j, event) == expected[index]
        if drains[index]:
            upserts, deletes = j.drain_changes()
            store.update(upserts)
            for key in deletes:
                store.pop(key, None)
            assert store == j.snapshot()  # the drained changes add up to the whole state
            committed_at = index + 1
    restored = Joiner.restore(store, config)
    if store:
        assert restored.snapshot() == store
    replayed = [feed(restored, event) for event in stream[committed_at:]]
    assert replayed == expected[committed_at:]
    assert restored.stats() == reference.stats()
    assert restored.snapshot() == reference.snapshot()


@pytest.mark.parametrize("policy", ["drop", "correct"])
def test_restore_exactly_at_a_close_keeps_the_row_closed(policy):
    j = joiner(policy)
    j.on_served(served())
    examples(j.on_watermark(T0 + W))  # the window closes exactly at the watermark
    restored = Joiner.restore(j.drain_changes()[0], j.config)
    assert restored.on_watermark(T0 + W + 1) == j.on_watermark(T0 + W + 1) == []  # no second example
    late = action(ts=T0 + 10, like=True)
    assert [encode(o) for o in restored.on_action(late)] == [encode(o) for o in j.on_action(late)]
    assert restored.stats() == j.stats() and restored.stats()["late"] == 1


def test_restore_refuses_another_window_and_bad_entries():
    j = joiner()
    j.on_served(served())
    j.on_action(action(request=5))
    entries = j.snapshot()
    with pytest.raises(InvalidInput, match="window_ms=1000"):
        Joiner.restore(entries, JoinerConfig(window_ms=2 * W, grace_ms=G))
    changed_grace = Joiner.restore(entries, JoinerConfig(window_ms=W, grace_ms=0, late_policy="correct"))
    assert changed_grace.stats()["held_rows"] == 1 and b"m" in changed_grace.drain_changes()[0]
    with pytest.raises(InvalidInput, match="unknown key"):
        Joiner.restore({**entries, b"zz": b"\x90"}, j.config)
    corrupt = {key: (b"\x01" if key.startswith(b"r") else value) for key, value in entries.items()}
    with pytest.raises(InvalidInput, match="corrupt"):
        Joiner.restore(corrupt, j.config)
    with pytest.raises(InvalidInput, match="no meta"):
        Joiner.restore({k: v for k, v in entries.items() if k != b"m"}, j.config)
    assert Joiner.restore({}, j.config).stats()["served"] == 0


@pytest.mark.parametrize(
    "config",
    [
        dict(window_ms=-1, grace_ms=0),
        dict(window_ms=1, grace_ms=-5),
        dict(window_ms=1, grace_ms=0, late_policy="keep"),
    ],
)
def test_bad_config_is_refused(config):
    with pytest.raises(InvalidInput):
        JoinerConfig(**config)


# ---- records -----------------------------------------------------------------------------------


def test_every_record_round_trips_to_identical_bytes():
    row = served()
    records = [
        row,
        action(like=True, watch=12),
        ConsentChange(7, False, T0),
        Example(row, True, False, False, True, False, False, 12, 2, True),
        DeadLetter("action", LATE, encode(action())),
    ]
    for record in records:
        data = encode(record)
        back = decode(data, type(record))
        assert back == record and encode(back) == data
    assert decode(encode(row), ServedRow).model_inputs().sparse["hashtags"] == (3, -4, INT64_MAX)


def test_bad_records_decode_to_a_typed_error_naming_the_field():
    good = msgspec.msgpack.decode(encode(action()))
    missing = good[:-1]
    wrong_type = [*good[:4], "later", *good[5:]]
    too_big = [2**63, *good[1:]]
    with pytest.raises(InvalidInput, match="at least length 11"):
        decode(msgspec.msgpack.encode(missing), Action)
    with pytest.raises(InvalidInput, match="ts_ms"):
        decode(msgspec.msgpack.encode(wrong_type), Action)
    with pytest.raises(InvalidInput, match="action_id"):
        decode(msgspec.msgpack.encode(too_big), Action)
    with pytest.raises(InvalidInput, match="not MessagePack"):
        decode(encode(action())[:-3], Action)
    row = msgspec.msgpack.decode(encode(served()))
    row[8][1]["item_id"] = ["x"]
    with pytest.raises(InvalidInput, match=r"ServedRow.*inputs"):
        decode(msgspec.msgpack.encode(row), ServedRow)
    with pytest.raises(InvalidInput, match="Example"):
        decode(encode(served()), Example)


# ---- watermark ---------------------------------------------------------------------------------


def test_watermark_is_the_slowest_partition_minus_the_allowed_disorder():
    tracker = WatermarkTracker(["served", "actions"], out_of_order_ms=100, idle_ms=5_000, now_ms=0)
    tracker.observe("served", 10_000, now_ms=10)
    assert tracker.watermark(now_ms=20) is None  # "actions" not read yet and not idle
    tracker.observe("actions", 9_000, now_ms=30)
    assert tracker.watermark(now_ms=40) == 8_900
    tracker.observe("actions", 8_000, now_ms=50)  # out of order: the maximum stays
    tracker.observe("served", 12_000, now_ms=60)
    assert tracker.watermark(now_ms=70) == 8_900


def test_idle_partition_advances_with_processing_time_and_watermark_never_goes_back():
    tracker = WatermarkTracker(["a", "b"], out_of_order_ms=0, idle_ms=1_000, now_ms=0)
    tracker.observe("a", 50_000, now_ms=0)
    tracker.observe("b", 20_000, now_ms=0)
    assert tracker.watermark(now_ms=999) == 20_000
    assert tracker.watermark(now_ms=3_000) == 23_000  # both idle: event time follows the clock
    tracker.observe("b", 21_000, now_ms=3_000)  # b wakes up behind the estimate
    assert tracker.watermark(now_ms=3_001) == 23_000
    never_read = WatermarkTracker(["x", "y"], out_of_order_ms=0, idle_ms=1_000, now_ms=0)
    never_read.observe("x", 500, now_ms=10)
    assert never_read.watermark(now_ms=500) is None
    assert never_read.watermark(now_ms=1_000) == 500  # y idle since it was added: no longer waited for
    with pytest.raises(InvalidInput, match="not tracked"):
        never_read.observe("z", 1, now_ms=1)
