"""The client's typed exceptions: what went wrong, in words an application can act on.

Every failure of `gpurec.client` is one of these, never a raw tritonclient, gRPC or socket
exception: the original is kept as ``__cause__`` for debugging. The split follows what a caller
does next: fix the request (`InvalidRequest`), fix the deployment (`UnknownModel`), try again
later or fail over (`ServerUnavailable`, already retried), or report a server bug (`ServerError`).
NaN/inf have their own subclasses: `NonFiniteInput` (the request held them) and `NonFiniteOutput`
(finite inputs drove the model to NaN/inf scores, e.g. a dense value of 1e38; the server refuses
to answer such scores).
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error raised by `gpurec.client`."""


class InvalidRequest(ClientError, ValueError):
    """The request does not match the serving contract; it was not sent (or the server refused it).

    Wrong dtype or shape, a missing or unknown feature, no candidates, more candidates than the
    model's `max_batch_size`, NaN/inf dense values, k < 1. Never retried: it would fail again.
    """


class UnknownModel(ClientError, LookupError):
    """The server has no such model (or version) loaded: a deployment problem, not retried."""


class ServerUnavailable(ClientError, ConnectionError):
    """The server could not be reached or did not answer in time, after every retry."""


class ServerError(ClientError, RuntimeError):
    """The server received the request and the model failed on it (the server's message is kept)."""


class NonFiniteInput(InvalidRequest):
    """A dense value is NaN or infinite (checked before sending; the server refuses it too)."""


class NonFiniteOutput(ServerError):
    """The model produced NaN or infinite scores for this request's rows, so the server answered
    an error instead. Usually inputs far out of the training range (a huge dense value); not
    retried: the same rows would fail again."""
