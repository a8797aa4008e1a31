"""What the blocking and the asyncio clients share: settings, the contract, request building."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpurec.client import _transport as tr
from gpurec.client.features import RecommendRequest, build_rows, candidate_ids, check_k, load_contract
from gpurec.data.pseudonym import Pseudonymizer
from gpurec.serve.contract import RANKER_MODEL, RECOMMEND_MODEL, ServingContract
from gpurec.serve.feed_contract import CONSENT_MODEL, FEED_MODEL


class RankerClientBase:
    """Settings of a client of the `ranker`, `recommend` and `feed` models; transport is the subclass's.

    `contract` is a ServingContract, a contract.json, a version directory or a repository root (its
    newest ranker version). With a `pseudonymizer` the client is the edge of pseudonymous ids: the
    user ids given to `feed` and `set_consent` are raw and leave as pseudonyms (results keep the
    caller's raw id), so the server, the event log and the store never see a raw id.
    Only an unreachable server is retried (`retries` times, backoff doubling
    from `backoff` seconds); `max_concurrency` bounds the requests `*_many` keeps in flight.
    """

    def __init__(
        self,
        url: str,
        contract: ServingContract | str | Path,
        protocol: str = "http",
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.1,
        max_concurrency: int = 8,
        model_version: str = "",
        ranker_model: str = RANKER_MODEL,
        recommend_model: str = RECOMMEND_MODEL,
        feed_model: str = FEED_MODEL,
        consent_model: str = CONSENT_MODEL,
        pseudonymizer: Pseudonymizer | None = None,
    ) -> None:
        self.url = tr.check_url(url)
        self.protocol = tr.check_protocol(protocol)
        self.contract = load_contract(contract)
        self.timeout = float(timeout)
        self.retry = tr.RetryPolicy(retries=retries, backoff=backoff)
        self.max_concurrency = max(1, int(max_concurrency))
        self.model_version = str(model_version)
        self.ranker_model = ranker_model
        self.recommend_model = recommend_model
        self.feed_model = feed_model
        self.consent_model = consent_model
        self.pseudonymizer = pseudonymizer
        self._tensors = tr.tensors_module(self.protocol)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.protocol}://{self.url}, timeout={self.timeout}, retries={self.retry.retries})"

    def _at_edge(self, user_id: Any) -> Any:
        """The id to send for a caller's user id: its pseudonym when the client holds a key.

        A value that is no int64 passes unchanged, so the request checks refuse it as before.
        """
        valid = isinstance(user_id, int | np.integer) and not isinstance(user_id, bool) and -(2**63) <= int(user_id) < 2**63
        return self.pseudonymizer.pseudonym(int(user_id)) if self.pseudonymizer is not None and valid else user_id

    def _rank_outputs(self) -> list:
        return tr.rank_outputs(self._tensors, self.contract)

    def _recommend_arrays(self, request: RecommendRequest) -> dict[str, np.ndarray]:
        k = check_k(request.k)
        rows = build_rows(self.contract, request.user, request.candidates)
        return tr.recommend_arrays(rows, candidate_ids(rows, request.item_ids), k)
