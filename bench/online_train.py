"""Online training throughput: examples/s of `gpurec train --online` against batch training's samples/s.

In one process, on the `make demo` run (``--run``, ``--data``): batch training (`recipe.train`, the
run's own configs, ``--steps`` steps of ``--batch-size``, from Parquet with its prefetching loader)
and online training (`train_online` with ``--drain``, the same batch size and model, started from
the run's checkpoint) on ``--examples`` examples of the valid split written to a SQLite event log
as the joiner writes them: reading the log, decoding, building batches, stepping, checkpointing at
the end. The two alternate over ``--rounds`` rounds; each reports its median. The target: online
>= 80% of batch. The last stdout line is one JSON object.

    .venv/bin/python bench/online_train.py            # after make demo; about 2 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "train")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "features")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.run / "checkpoints").is_dir() or not (args.data / "manifest.json").is_file():
        print(f"bench/online_train.py: need a trained run {args.run} and features {args.data}: run `make demo`", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    from gpurec.model.checkpoint import read_trained_run
    from gpurec.model.config import ModelConfig
    from gpurec.model.library_warnings import quiet_library_warnings
    from gpurec.stream.log import Record, open_event_log
    from gpurec.stream.records import encode
    from gpurec.sync.examples import EXAMPLES_TOPIC, examples_from_features
    from gpurec.sync.online import OnlineSettings, train_online
    from gpurec.train.config import TrainConfig
    from gpurec.train.recipe import train

    quiet_library_warnings()
    written = read_trained_run(args.run)
    train_config = dataclasses.replace(
        TrainConfig.from_dict(dict(written.train_config)), batch_size=args.batch_size, max_steps=args.steps, epochs=1
    )
    model_config: ModelConfig = written.model_config
    examples = examples_from_features(args.data, "valid", limit=args.steps * args.batch_size)
    batch_rates, online_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/log.db"
        with open_event_log(url) as log:
            log.create_topic(EXAMPLES_TOPIC, 4)
            ordered = sorted(examples, key=lambda e: e.served.ts_ms)
            log.append(EXAMPLES_TOPIC, [Record(e.served.user_id, encode(e), e.served.ts_ms) for e in ordered])
            for index in range(args.rounds):
                summary = train(args.data, Path(tmp) / f"batch-{index}", model_config, train_config, progress=False)
                batch_rates.append(summary["samples_per_s"])
                settings = OnlineSettings(batch_size=args.batch_size, checkpoint_every_s=1e9)
                report = train_online(log, Path(tmp) / f"online-{index}", settings, init=args.run, drain=True, progress=False)
                online_rates.append(report["examples_per_s"])  # from its first step, as batch's samples/s
    online, batch = statistics.median(online_rates), statistics.median(batch_rates)
    result = {
        "bench": "online_train",
        "examples": len(examples),
        "batch_size": args.batch_size,
        "online_examples_per_s": round(online, 1),
        "baseline": "batch training (recipe.train) on Parquet, same model, batch size and step count, same run",
        "baseline_samples_per_s": round(batch, 1),
        "ratio": round(online / batch, 3),
        "target_met": online >= 0.8 * batch,
        "machine": f"{platform.machine()}, {args.threads} torch threads",
    }
    print(f"online {online:,.0f} examples/s vs batch {batch:,.0f} samples/s ({result['ratio']:.2f}x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
