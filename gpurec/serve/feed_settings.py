"""Where the feed finds its feature store and event log, and its knobs: export-time and serve-time.

Precedence, for the two URLs (highest first):

1. the server's environment, `GPUREC_FEATURE_STORE` / `GPUREC_EVENT_LOG`: what
   `gpurec serve --feature-store URL --event-log URL` sets for the tritonserver it starts (or an
   operator sets in a container), so one repository can be served against another store or log;
2. the `parameters` of `feed/config.pbtxt`, written by `gpurec export --feature-store URL
   --event-log URL`;
3. none: the feed model loads (so the rest of the repository serves) and answers every request
   with an UNAVAILABLE error naming the missing setting.

The other knobs (max_n, the store read timeout, the candidate pools) live only in config.pbtxt.
A relative SQLite path (`sqlite:///runs/x.db` or `runs/x.db`) is made absolute where it is given
(export, serve), because the server resolves paths from its own working directory.

Standard library only: `gpurec serve` reads this before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from gpurec.errors import InvalidInput
from gpurec.serve.feed_contract import DEFAULT_MAX_N

if TYPE_CHECKING:
    from gpurec.serve.candidates import CandidateConfig

FEATURE_STORE_ENV: Final = "GPUREC_FEATURE_STORE"
EVENT_LOG_ENV: Final = "GPUREC_EVENT_LOG"
SYNC_DIR_ENV: Final = "GPUREC_SYNC_DIR"  # the ranker's parameter deltas (triton_models/ranker/model.py)
_PASS_THROUGH = ("redis", "rediss", "unix", "kafka")


@dataclass(frozen=True)
class FeedSettings:
    """Everything `feed/config.pbtxt` says about the feed (`parameters`, all strings there)."""

    feature_store: str = ""
    event_log: str = ""
    max_n: int = DEFAULT_MAX_N
    store_timeout_ms: int = 50
    """A store read slower than this is abandoned for default features (and counted)."""
    served_partitions: int = 4
    """Partitions of the `served` topic if the feed has to create it."""
    fresh: int = 100
    regional: int = 100
    trending: int = 100
    fresh_window_ms: int = 2 * 86_400_000
    half_life_ms: int = 6 * 3_600_000
    exclude_requests: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidInput(f"feed setting {f.name} must be an integer >= 0, got {value!r}")
        if self.max_n < 1 or self.served_partitions < 1 or self.store_timeout_ms < 1:
            raise InvalidInput("feed settings max_n, served_partitions and store_timeout_ms must be at least 1")

    def candidate_config(self) -> CandidateConfig:
        """The candidate source's configuration (InvalidInput for knobs it refuses)."""
        from gpurec.serve.candidates import CandidateConfig

        return CandidateConfig(
            fresh=self.fresh,
            regional=self.regional,
            trending=self.trending,
            fresh_window_ms=self.fresh_window_ms,
            half_life_ms=self.half_life_ms,
            exclude_requests=self.exclude_requests,
        )

    def parameters(self) -> dict[str, str]:
        """The settings as config.pbtxt `parameters` (empty URLs are left out)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) != ""}

    @classmethod
    def from_model_config(cls, model_config: str, environ: Mapping[str, str] | None = None) -> FeedSettings:
        """Settings of a python-backend model (feed, consent) from the model config JSON Triton
        hands to `initialize` (`args["model_config"]`): its `parameters`, then the environment."""
        parameters = json.loads(model_config).get("parameters", {})
        return cls.from_parameters({key: value["string_value"] for key, value in parameters.items()}, environ)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], environ: Mapping[str, str] | None = None) -> FeedSettings:
        """Settings from config.pbtxt `parameters`, the URLs overridden by the environment."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name not in parameters:
                continue
            text = parameters[f.name]
            if f.type == "int":
                try:
                    values[f.name] = int(text)
                except ValueError:
                    raise InvalidInput(f"feed parameter {f.name} must be an integer, got {text!r}") from None
            else:
                values[f.name] = text
        environ = environ or {}
        for name, variable in (("feature_store", FEATURE_STORE_ENV), ("event_log", EVENT_LOG_ENV)):
            if environ.get(variable):
                values[name] = environ[variable]
        return cls(**values)  # type: ignore[arg-type]


def normalise_url(url: str, what: str) -> str:
    """A feature-store or event-log URL with any SQLite path made absolute; InvalidInput for an
    unknown scheme. Redis, unix-socket and Kafka URLs are returned as given."""
    text = str(url).strip()
    if not text:
        raise InvalidInput(f"{what}: empty URL")
    parts = urlsplit(text)
    if parts.scheme in _PASS_THROUGH:
        return text
    if parts.scheme == "sqlite":
        if not text.startswith("sqlite:///") or not parts.path[1:]:
            raise InvalidInput(f"{what}: a SQLite URL looks like sqlite:///path/to/file.db, got {text!r}")
        path, query = parts.path[1:], f"?{parts.query}" if parts.query else ""
    elif parts.scheme and len(parts.scheme) > 1:
        raise InvalidInput(f"{what}: unknown URL scheme {parts.scheme!r} in {text!r} (sqlite:///, redis://, kafka://)")
    else:
        path, query = text, ""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise InvalidInput(f"{what}: {resolved} is a directory; give a database file such as {resolved / 'log.db'}")
    return f"sqlite:///{resolved}{query}"


__all__ = ["EVENT_LOG_ENV", "FEATURE_STORE_ENV", "FeedSettings", "normalise_url", "open_existing"]


def _sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL or plain path (None for network backends)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return Path(parts.path[1:])
    return None if parts.scheme and len(parts.scheme) > 1 else Path(url)


def open_existing(url: str, what: str, opener: Callable[[str], object]) -> object:
    """Open a store or log, refusing to create a SQLite file: the feed is a reader of both, and a
    mistyped path would otherwise serve from (or log into) an empty new file."""
    path = _sqlite_path(url)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (yet)")
    return opener(url)
