"""One deployment's state under one directory: the workspace.

    runs/demo/                      a workspace (what `gpurec demo --out` writes)
      workspace.toml                optional: event_log / feature_store URLs, [retention] windows
      raw/                          generated or imported logs (Parquet) + world.json
      features/                     preprocessed splits (Parquet) + manifest.json
      train/                        the batch run: checkpoints/, metrics.jsonl, train_summary.json
      repo/                         the exported Triton model repository (ranker, feed, consent)
      online/                       the online trainer's run: checkpoints/
      live/log.db                   the embedded event log (every topic, dead letters, joiner state)
      live/features.db              the embedded online feature store
      live/sync/                    parameter deltas and snapshots (what serving follows)
      live/*.log                    the long-running stages' output
      privacy/                      what the privacy commands write (exports, forget receipts)

The privacy commands (`gpurec forget`, `gpurec export-user`, `gpurec retention`) take
`--workspace DIR` and find everything through this class, so "every place a user's data lives" is
written down once. A base module like `gpurec.checks`: any stage may import it, it imports none.

The event log and the feature store may live outside the directory (a Kafka broker, a Redis
server): `workspace.toml` then names their URLs. Unknown keys are an error, as in every gpurec
config, so a misspelt key cannot silently fall back to the embedded default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpurec.errors import InputNotFound, InvalidInput

CONFIG_FILE = "workspace.toml"
_KNOWN_KEYS = ("event_log", "feature_store", "retention")
_ENTRIES = ("raw", "features", "train", "repo", "online", "live")


@dataclass(frozen=True)
class Workspace:
    root: Path
    event_log_url: str = ""
    feature_store_url: str = ""
    retention: Mapping[str, Any] = field(default_factory=dict)  # validated by gpurec.privacy.retention

    def __post_init__(self) -> None:
        root = Path(self.root).resolve()
        object.__setattr__(self, "root", root)
        if not self.event_log_url:
            object.__setattr__(self, "event_log_url", f"sqlite:///{root / 'live' / 'log.db'}")
        if not self.feature_store_url:
            object.__setattr__(self, "feature_store_url", f"sqlite:///{root / 'live' / 'features.db'}")

    # ---- where each stage's output lives ---------------------------------------------------
    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def online(self) -> Path:
        return self.root / "online"

    @property
    def live(self) -> Path:
        return self.root / "live"

    @property
    def sync(self) -> Path:
        return self.live / "sync"

    @property
    def privacy(self) -> Path:
        return self.root / "privacy"

    @property
    def runs(self) -> tuple[Path, ...]:
        """Training runs whose checkpoints hold embedding rows."""
        return (self.train, self.online)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    # ---- opening one ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, what: str = "--workspace") -> Workspace:
        """An existing workspace (a directory, with its workspace.toml read if there is one)."""
        root = Path(root)
        if not root.exists():
            raise InputNotFound(f"{what} {root} does not exist")
        if not root.is_dir():
            raise InvalidInput(f"{what} {root} is a file, not a directory")
        if not any((root / name).exists() for name in (*_ENTRIES, CONFIG_FILE)):
            raise InvalidInput(
                f"{what} {root} is not a gpurec workspace (it has none of {', '.join(_ENTRIES)}/ or {CONFIG_FILE})"
            )
        settings = read_config(root / CONFIG_FILE)
        return cls(
            root,
            event_log_url=settings.get("event_log", ""),
            feature_store_url=settings.get("feature_store", ""),
            retention=settings.get("retention", {}),
        )


def read_config(path: Path) -> dict[str, Any]:
    """workspace.toml as a dict ({} when there is none); unknown or mistyped keys are refused."""
    if not path.exists():
        return {}
    try:
        with path.open("rb") as f:
            settings = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(settings) - set(_KNOWN_KEYS))
    if unknown:
        raise InvalidInput(f"{path}: unknown keys {unknown} (known keys: {', '.join(_KNOWN_KEYS)})")
    for key in ("event_log", "feature_store"):
        if key in settings and not (isinstance(settings[key], str) and settings[key]):
            raise InvalidInput(f"{path}: {key} must be a non-empty URL string")
    if "retention" in settings and not isinstance(settings["retention"], dict):
        raise InvalidInput(f"{path}: [retention] must be a table")
    return settings
