"""The `feed` model's request and response, by name: what the client and the server agree on.

A feed request names a user and how many items to show; the server finds the candidates, reads
their features, ranks them with `ranker`, logs what it shows and answers:

    inputs   user_id INT64 [1]      the raw user id (an unknown user is a cold start, not an error)
             n INT32 [1]            how many items, 1..max_n
             ts_ms INT64 [1]        optional: the request's event time (default: the server's clock)
             request_id INT64 [1]   optional: the caller's request id (default: one is generated)
    outputs  item_ids INT64 [n']    raw item ids, best first, n' <= n (fewer only if the catalogue is)
             scores FP32 [n']       the ranker's combined score of each
             request_id INT64 [1]   the id the served rows were logged under
             model_version BYTES [1] the ranker version that scored them

Imported by the client: the standard library only.
"""

from __future__ import annotations

from typing import Final

FEED_MODEL: Final = "feed"

USER_ID_INPUT: Final = "user_id"
N_INPUT: Final = "n"
TS_INPUT: Final = "ts_ms"
REQUEST_ID_INPUT: Final = "request_id"

ITEM_IDS_OUTPUT: Final = "item_ids"
SCORES_OUTPUT: Final = "scores"
REQUEST_ID_OUTPUT: Final = "request_id"
MODEL_VERSION_OUTPUT: Final = "model_version"

DEFAULT_MAX_N: Final = 100
"""The most items one feed request may ask for, unless export sets another `max_n`."""

# The `consent` model: one user's consent change, effective at their next feed request.
#   inputs   user_id INT64 [1]; personalisation BOOL [1], training BOOL [1] (optional: a flag left
#            out keeps its value, at least one is required); ts_ms INT64 [1] (optional: event time)
#            forget BOOL [1] (optional: true erases the user, `gpurec.privacy.forget`'s request step)
#   outputs  personalisation BOOL [1], training BOOL [1] (the consent after the change), ts_ms INT64 [1]
CONSENT_MODEL: Final = "consent"
PERSONALISATION: Final = "personalisation"
TRAINING: Final = "training"
FORGET: Final = "forget"

__all__ = [
    "CONSENT_MODEL",
    "DEFAULT_MAX_N",
    "FEED_MODEL",
    "FORGET",
    "ITEM_IDS_OUTPUT",
    "MODEL_VERSION_OUTPUT",
    "N_INPUT",
    "PERSONALISATION",
    "REQUEST_ID_INPUT",
    "REQUEST_ID_OUTPUT",
    "SCORES_OUTPUT",
    "TRAINING",
    "TS_INPUT",
    "USER_ID_INPUT",
]
