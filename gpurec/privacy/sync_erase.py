"""Erasing a user from what serving reads: the sync directory and the Triton model repository.

Deltas and snapshots carry embedding rows and id-map slots by value, so a delta written before a
user was forgotten holds their row. Rather than editing those files, the purge writes a fresh
snapshot from the (already rewritten) online checkpoint, which holds no row for the user, and
deletes every delta and snapshot before it: a server that starts or restarts reads the new
snapshot; one already running reloads from it when it sees the sequence jump. The bound: old
deltas live until `gpurec forget` purges (or the publisher's compaction drops them; see
`DeltaPublisher._compact`).

The model repository's TorchScript artifact embeds the batch model's tables and id map, so it is
re-exported from the rewritten batch checkpoint as the next version, and older versions are
deleted. A running Triton keeps serving the version it loaded (with the deltas applied, which
already reset the user) until it loads the new one (model control poll, or a restart).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gpurec.model.checkpoint import best_checkpoint, latest_checkpoint
from gpurec.sync.deltafile import list_deltas
from gpurec.workspace import Workspace


def _load_trainer(checkpoint: Path):
    import dataclasses

    from gpurec.model.checkpoint import read_trained_run
    from gpurec.train.config import TrainConfig
    from gpurec.train.distributed import init_distributed
    from gpurec.train.recipe import build_trainer

    written = read_trained_run(checkpoint)
    config = TrainConfig.from_dict(dict(written.train_config))
    ctx = init_distributed(config.device)
    run = dataclasses.replace(written, world_size=ctx.world_size)
    trainer = build_trainer(run, config, ctx, ([0.0] * run.num_dense, [1.0] * run.num_dense))
    state = trainer.resume(checkpoint)
    return trainer, state


def erase_sync_dir(ws: Workspace) -> dict[str, Any]:
    """A fresh snapshot from the newest online checkpoint, every older delta and snapshot deleted."""
    existing = list_deltas(ws.sync) if ws.sync.is_dir() else []
    if not existing:
        return {"snapshot": None, "deleted": 0}
    source = latest_checkpoint(ws.online) or best_checkpoint(ws.train) or latest_checkpoint(ws.train)
    if source is None:  # no model to rebuild a snapshot from: serving cannot use the deltas anyway
        for _, _, path in existing:
            path.unlink(missing_ok=True)
        return {"snapshot": None, "deleted": len(existing)}
    from gpurec.sync.publish import DeltaPublisher

    trainer, _ = _load_trainer(source)
    publisher = DeltaPublisher(trainer, ws.sync)  # writes a full snapshot as it starts
    newest = publisher.seq
    deleted = 0
    for seq, _, path in list_deltas(ws.sync):
        if seq < newest:
            path.unlink(missing_ok=True)
            deleted += 1
    return {"snapshot": newest, "from": str(source.relative_to(ws.root)), "deleted": deleted}


def reexport_repository(ws: Workspace) -> dict[str, Any]:
    """The batch model re-exported from its rewritten checkpoint as the next version of every
    model in the repository; older versions deleted. Nothing when there is no repository."""
    if not ws.repo.is_dir():
        return {"version": None}
    source = best_checkpoint(ws.train) or latest_checkpoint(ws.train)
    if source is None:
        return {"version": None}
    from gpurec.serve.export import export_repository
    from gpurec.serve.feed_settings import FeedSettings

    feed = FeedSettings(feature_store=ws.feature_store_url, event_log=ws.event_log_url)
    result = export_repository(source, ws.repo, feed=feed)
    removed = 0
    for model in ws.repo.iterdir():
        if not model.is_dir():
            continue
        for version in model.iterdir():
            if version.is_dir() and version.name.isdigit() and int(version.name) < result.version:
                shutil.rmtree(version)
                removed += 1
    return {"version": result.version, "versions_deleted": removed}
