"""Throughput of the streaming joiner on one core, with decoding and encoding, against stdlib json.

A pre-generated, encoded stream in arrival order, as a runner reads it from the event log:
``--requests`` feed requests of 6 served rows each (one per user visit, ``--users`` users, event
time at ``--rate`` served rows/s; 8 dense inputs, 9 sparse features), about 1.2 action events per
served row (30% none, 35% one, 20% two, 15% three: a watch, then like/share/skip), 2% of action
events delivered twice, 1% arriving after their window closed, 5% of served rows lagging up to 3 s
(so some actions come first). Window W = ``--window-ms``, grace G = ``--grace-ms``, policy
"correct"; about (W + G) x rate rows are held at once.

What is timed (one process, one thread, garbage collector on): per record, decode the bytes into
a typed, validated record, call the joiner, encode every output; per batch of ``--batch`` records
(a runner's transaction), feed the watermark helper, advance the joiner's watermark and
`drain_changes()` (the state a runner would commit). The stream ends with a watermark that flushes
every window. Timed by process CPU time, because other work shares this machine's cores.

Baseline, in the same run on the same stream: the same joiner with the records as stdlib JSON
(``json.dumps`` of a dict; ``json.loads`` plus the same type and int64 checks in Python, then the
same record structs). State entries use msgspec in both. The two paths alternate over ``--rounds``
rounds; an extra untimed run of each checks that both emitted the same outputs in the same order.
The last stdout line is one JSON object.

    .venv/bin/python bench/joiner.py           # 240k served rows, ~313k actions, 3 rounds, ~2 min
    .venv/bin/python bench/joiner.py --quick   # 24k served rows, W = G = 1 s, 2 rounds, ~15 s
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import msgspec

from gpurec.stream.joiner import Joiner, JoinerConfig
from gpurec.stream.records import (
    INT64_MAX,
    INT64_MIN,
    Action,
    DeadLetter,
    Example,
    ModelInputs,
    ServedRow,
    decoder,
    encode,
    encode_inputs,
)
from gpurec.stream.watermark import WatermarkTracker

T0 = 1_760_000_000_000
ROWS_PER_REQUEST = 6
ACTIONS_PER_ROW = (0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3) * 2  # 30/35/20/15 % (mean ~1.2)
SPARSE = (
    "user_id",
    "item_id",
    "author_id",
    "user_region",
    "device",
    "user_language",
    "item_language",
    "hour",
)
DENSE = 8
OUT_OF_ORDER_MS = 2_000


# ---- the stream ---------------------------------------------------------------------------------


def make_stream(args: argparse.Namespace) -> list[tuple[str, int, object]]:
    """(topic, arrival ms, record) in arrival order; topic "served" or "actions"."""
    rng = random.Random(args.seed)
    events: list[tuple[int, int, str, object]] = []
    action_id = 0
    gap_ms = 1000 * ROWS_PER_REQUEST / args.rate
    for request in range(args.requests):
        user = rng.randrange(args.users)
        ts = T0 + int(request * gap_ms)
        for position in range(ROWS_PER_REQUEST):
            item = rng.randrange(1, 50_000)
            inputs = ModelInputs(
                tuple(rng.random() for _ in range(DENSE)),
                {name: (rng.getrandbits(63),) for name in SPARSE}
                | {"hashtags": tuple(rng.getrandbits(63) for _ in range(rng.randrange(4)))},
            )
            duration = rng.randrange(3_000, 90_000)
            row = ServedRow(
                request,
                item,
                user,
                ts,
                position,
                "v20261126",
                duration,
                rng.random() > 0.02,
                encode_inputs(inputs),
            )
            # The served topic usually leads; 5% of rows lag up to 3 s (their fast actions come first).
            lag = rng.randrange(3_000) if rng.random() < 0.05 else rng.randrange(50)
            events.append((ts + lag, len(events), "served", row))
            for kind in range(rng.choice(ACTIONS_PER_ROW)):
                action_id += 1
                act_ts = ts + rng.randrange(args.window_ms * 4 // 5)
                watch = rng.randrange(duration * 11 // 10)
                act = Action(action_id, request, item, user, act_ts, watch if kind == 0 else 0,
                             kind > 0 and rng.random() < 0.5, kind > 0 and rng.random() < 0.1, False, False,
                             kind == 0 and rng.random() < 0.3)  # fmt: skip
                late = rng.random() < 0.01
                # Late: after its window closed (the watermark trails arrivals by OUT_OF_ORDER_MS).
                close = ts + args.window_ms + OUT_OF_ORDER_MS
                arrival = close + rng.randrange(500, args.grace_ms) if late else act_ts + rng.randrange(2_000)
                events.append((arrival, len(events), "actions", act))
                if rng.random() < 0.02:
                    events.append((arrival + rng.randrange(1_000), len(events), "actions", act))
    events.sort(key=lambda e: (e[0], e[1]))
    return [(topic, arrival, record) for arrival, _, topic, record in events]


# ---- codecs ---------------------------------------------------------------------------------------


def _int(value: object, name: str) -> int:
    if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an int64")
    return value


def json_encode(record: ServedRow | Action | Example | DeadLetter) -> bytes:
    def served_dict(row: ServedRow) -> dict:
        names = ServedRow.__struct_fields__[:-1]
        inputs = row.model_inputs()
        return {
            **{n: getattr(row, n) for n in names},
            "inputs": {"dense": inputs.dense, "sparse": inputs.sparse},
        }

    if isinstance(record, ServedRow):
        return json.dumps(served_dict(record)).encode()
    if isinstance(record, Example):
        labels = {n: getattr(record, n) for n in Example.__struct_fields__[1:]}
        return json.dumps({"served": served_dict(record.served), **labels}).encode()
    if isinstance(record, DeadLetter):
        return json.dumps(
            {**msgspec.structs.asdict(record), "record": base64.b64encode(record.record).decode()}
        ).encode()
    return json.dumps({n: getattr(record, n) for n in type(record).__struct_fields__}).encode()


def json_decode_served(data: bytes) -> ServedRow:
    d = json.loads(data)
    for name in ("request_id", "item_id", "user_id", "ts_ms", "position", "duration_ms"):
        _int(d[name], name)
    if type(d["model_version"]) is not str or type(d["consent_training"]) is not bool:
        raise ValueError("model_version / consent_training")
    dense = d["inputs"]["dense"]
    if not all(type(v) is float for v in dense):
        raise ValueError("dense")
    sparse = {k: tuple(_int(v, k) for v in ids) for k, ids in d["inputs"]["sparse"].items()}
    return ServedRow(d["request_id"], d["item_id"], d["user_id"], d["ts_ms"], d["position"], d["model_version"],
                     d["duration_ms"], d["consent_training"], encode_inputs(ModelInputs(tuple(dense), sparse)))  # fmt: skip


def json_decode_action(data: bytes) -> Action:
    d = json.loads(data)
    ints = [_int(d[n], n) for n in ("action_id", "request_id", "item_id", "user_id", "ts_ms", "watch_ms")]
    flags = [d[n] for n in ("like", "share", "comment", "follow", "skip")]
    if not all(type(f) is bool for f in flags):
        raise ValueError("flags")
    return Action(*ints, *flags)


CODECS: dict[str, tuple[Callable, Callable, Callable]] = {
    "msgspec": (encode, decoder(ServedRow), decoder(Action)),
    "stdlib_json": (json_encode, json_decode_served, json_decode_action),
}


def summary_msgpack(data: bytes) -> tuple:
    """What an output says, for checking that both paths emitted the same outputs in the same order."""
    fields = msgspec.msgpack.decode(data)
    if isinstance(fields[0], str):
        return ("dead letter", fields[1], fields[2])
    return (fields[0][0], fields[0][1], fields[0][8][0], *fields[1:])


def summary_json(data: bytes) -> tuple:
    d = json.loads(data)
    if "reason" in d:
        return ("dead letter", d["reason"], base64.b64decode(d["record"]))
    labels = [d[n] for n in Example.__struct_fields__[1:]]
    return (d["served"]["request_id"], d["served"]["item_id"], d["served"]["inputs"]["dense"], *labels)


# ---- the run --------------------------------------------------------------------------------------


def run(
    batches: list[tuple[int, list[tuple[bool, bytes]]]], codec: str, args: argparse.Namespace, keep: bool
) -> dict:
    """Feed the batches (arrival time, [(is_served, bytes)]) through a fresh joiner, as a runner would.

    Each batch's outputs are dropped after its transaction (counted), unless `keep` (for checking).
    """
    encode_out, decode_served, decode_action = CODECS[codec]
    joiner = Joiner(JoinerConfig(window_ms=args.window_ms, grace_ms=args.grace_ms, late_policy="correct"))
    on_served, on_action = joiner.on_served, joiner.on_action
    tracker = WatermarkTracker(
        ["served", "actions"], out_of_order_ms=OUT_OF_ORDER_MS, idle_ms=5_000, now_ms=0
    )
    kept: list[bytes] = []
    state_bytes = output_bytes = 0
    gc.collect()
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for arrival, batch in batches:
        outputs: list[bytes] = []
        latest_served = latest_action = INT64_MIN
        for is_served, data in batch:
            if is_served:
                row = decode_served(data)
                out = on_served(row)
                if row.ts_ms > latest_served:
                    latest_served = row.ts_ms
            else:
                action = decode_action(data)
                out = on_action(action)
                if action.ts_ms > latest_action:
                    latest_action = action.ts_ms
            if out:
                outputs.extend([encode_out(o) for o in out])
        # The runner's transaction: watermark, outputs, state changes (committed with the offsets).
        now_ms = arrival - T0
        if latest_served != INT64_MIN:
            tracker.observe("served", latest_served, now_ms=now_ms)
        if latest_action != INT64_MIN:
            tracker.observe("actions", latest_action, now_ms=now_ms)
        watermark = tracker.watermark(now_ms=now_ms)
        if watermark is not None:
            outputs.extend([encode_out(o) for o in joiner.on_watermark(watermark)])
        upserts, _ = joiner.drain_changes()
        state_bytes += sum(map(len, upserts.values()))
        output_bytes += sum(map(len, outputs))
        if keep:
            kept.extend(outputs)
    outputs = [encode_out(o) for o in joiner.on_watermark(INT64_MAX - 1)]
    joiner.drain_changes()
    output_bytes += sum(map(len, outputs))
    if keep:
        kept.extend(outputs)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "outputs": kept,
        "output_bytes": output_bytes,
        "stats": joiner.stats(),
        "state_bytes": state_bytes,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=6_000.0, help="served rows per second of event time")
    parser.add_argument("--window-ms", type=int, default=5_000)
    parser.add_argument("--grace-ms", type=int, default=3_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4k requests, W 1 s, G 1 s, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:  # 4 s of event time: a 1 s window still reaches its steady state
        args.requests, args.window_ms, args.grace_ms, args.rounds = 4_000, 1_000, 1_000, 2

    raw = make_stream(args)
    served = sum(1 for topic, _, _ in raw if topic == "served")
    actions = len(raw) - served
    streams: dict[str, list[tuple[int, list[tuple[bool, bytes]]]]] = {}
    record_bytes: dict[str, int] = {}
    for codec, (encode_record, _, _) in CODECS.items():
        encoded = [(topic == "served", encode_record(record)) for topic, _, record in raw]
        record_bytes[codec] = round(sum(len(data) for _, data in encoded) / len(encoded))
        streams[codec] = [
            (raw[min(i + args.batch, len(raw)) - 1][1], encoded[i : i + args.batch])
            for i in range(0, len(raw), args.batch)
        ]
    del raw
    cpu: dict[str, list[float]] = {codec: [] for codec in CODECS}
    wall: dict[str, list[float]] = {codec: [] for codec in CODECS}
    for _ in range(args.rounds):
        for codec in CODECS:
            timed = run(streams[codec], codec, args, keep=False)
            cpu[codec].append(timed["cpu_s"])
            wall[codec].append(timed["wall_s"])
    # One more, untimed run per codec, keeping the outputs: both must have emitted the same ones.
    results = {codec: run(streams[codec], codec, args, keep=True) for codec in CODECS}
    mine, base = results["msgspec"], results["stdlib_json"]
    same = [summary_msgpack(b) for b in mine["outputs"]] == [summary_json(b) for b in base["outputs"]]
    assert same and mine["stats"] == base["stats"], "the two codecs' runs emitted different outputs"
    # This machine's speed drifts (a plain Python loop varies up to 2x between runs): the figures use
    # each path's fastest round, the medians are reported beside them, and the ratio pairs the two.
    best = {codec: min(s) for codec, s in cpu.items()}
    median = {codec: statistics.median(s) for codec, s in cpu.items()}
    stats = mine["stats"]
    kept = ("examples", "positives", "negatives", "joined", "early", "duplicates", "late", "corrections",
            "non_consenting", "dead_letters")  # fmt: skip
    result = {
        "bench": "joiner",
        "actions_per_s": round(actions / best["msgspec"]),
        "served_per_s": round(served / best["msgspec"]),
        "events_per_s": round((actions + served) / best["msgspec"]),
        "actions_per_s_median": round(actions / median["msgspec"]),
        "timed_by": "process CPU time of one thread, fastest of the rounds",
        "baseline": "the same joiner and stream with records as stdlib json (+ the same checks in Python)",
        "baseline_actions_per_s": round(actions / best["stdlib_json"]),
        "baseline_actions_per_s_median": round(actions / median["stdlib_json"]),
        "ratio_vs_baseline": round(best["stdlib_json"] / best["msgspec"], 2),
        "ratio_vs_baseline_median": round(median["stdlib_json"] / median["msgspec"], 2),
        "served_rows": served,
        "action_events": actions,
        "record_bytes": record_bytes,
        "state_bytes_drained_per_event": round(mine["state_bytes"] / (actions + served)),
        "output_bytes_per_example": round(mine["output_bytes"] / stats["examples"]),
        "cpu_s": {codec: [round(s, 3) for s in ss] for codec, ss in cpu.items()},
        "wall_s": {codec: [round(s, 3) for s in ss] for codec, ss in wall.items()},
        "stats": {k: stats[k] for k in kept},
        "config": {
            k: getattr(args, k)
            for k in ("requests", "users", "rate", "window_ms", "grace_ms", "batch", "rounds")
        },
        "machine": f"{platform.machine()} python {platform.python_version()} msgspec {msgspec.__version__}",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
