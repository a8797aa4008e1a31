"""The Python client of gpurec's Triton models: numpy + tritonclient only (`pip install gpurec[client]`).

    from gpurec.client import RankerClient
    with RankerClient("127.0.0.1:8000", contract="runs/demo/repo", protocol="http") as client:
        result = client.rank(user, candidates)          # .tasks["like"], .tasks["finish"], .score
        top = client.recommend(user, 5, candidates)     # .item_ids, .scores, .indices
        feed = client.feed(user_id, 6)                  # the live feed: .item_ids, .scores, .request_id
        client.set_consent(user_id, personalisation=False, training=False)  # effective at the next request

- `RankerClient` (blocking) and `AsyncRankerClient` (asyncio), HTTP or gRPC, with timeouts and
  retries with exponential backoff for an unreachable server;
- `rank_many` / `recommend_many` / `feed_many`: many users per call, sent concurrently;
- requests are checked against the serving contract before they are sent; every failure is one
  of the typed errors in `gpurec.client.errors`.

Importing this package never imports torch or Polars (a test checks it in a fresh interpreter);
tritonclient's HTTP or gRPC module is imported when a client of that protocol is created.
"""

from gpurec.client.aio import AsyncRankerClient
from gpurec.client.errors import (
    ClientError,
    InvalidRequest,
    NonFiniteInput,
    NonFiniteOutput,
    ServerError,
    ServerUnavailable,
    UnknownModel,
)
from gpurec.client.features import (
    ConsentResult,
    FeedRequest,
    FeedResult,
    RankRequest,
    RankResult,
    Recommendation,
    RecommendRequest,
    build_rows,
    hash_raw,
    load_contract,
)
from gpurec.client.sync import RankerClient

__all__ = [
    "AsyncRankerClient",
    "ClientError",
    "ConsentResult",
    "FeedRequest",
    "FeedResult",
    "InvalidRequest",
    "NonFiniteInput",
    "NonFiniteOutput",
    "RankRequest",
    "RankResult",
    "RankerClient",
    "RecommendRequest",
    "Recommendation",
    "ServerError",
    "ServerUnavailable",
    "UnknownModel",
    "build_rows",
    "hash_raw",
    "load_contract",
]
