"""Triton `config.pbtxt` text for the `ranker` and `recommend` models, generated from the contract.

Generated, never hand-written: the inputs/outputs come from the same `ServingContract` that is
written as `contract.json`, so the server's shape checks and the client's can't drift apart.

- `ranker`: batched (`max_batch_size`), dynamic batching on, so concurrent requests from many
  users (and `recommend` calls) are scored in one forward pass; one instance per GPU when CUDA is
  present (KIND_GPU), else CPU instances.
- `recommend`: a BLS model (`max_batch_size: 0`: its first dim is the N candidates of one user)
  that calls `ranker` and keeps the top k; it holds no weights, so it runs on CPU.
- `feed`: a BLS model (one user per request) that finds candidates, reads their features, calls
  `ranker` and logs what it shows; CPU instances, its settings (feature store, event log, knobs)
  as `parameters` (see `gpurec.serve.feed_settings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpurec.serve.contract import RANKER_MODEL, RECOMMEND_MODEL, ServingContract, TensorSpec
from gpurec.serve.feed_contract import (
    CONSENT_MODEL,
    FEED_MODEL,
    FORGET,
    ITEM_IDS_OUTPUT,
    MODEL_VERSION_OUTPUT,
    N_INPUT,
    PERSONALISATION,
    REQUEST_ID_INPUT,
    REQUEST_ID_OUTPUT,
    SCORES_OUTPUT,
    TRAINING,
    TS_INPUT,
    USER_ID_INPUT,
)


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching knobs: how long a request may wait for others (µs) and preferred sizes."""

    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1


def instance_kind(use_gpu: bool | None = None) -> str:
    """KIND_GPU when CUDA is visible (or asked for), else KIND_CPU."""
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    return "KIND_GPU" if use_gpu else "KIND_CPU"


def _tensor_block(kind: str, specs: list[TensorSpec]) -> str:
    entries = [
        f'  {{\n    name: "{s.name}"\n    data_type: TYPE_{s.triton_dtype}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
        for s in specs
    ]
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def ranker_config(contract: ServingContract, kind: str, batching: BatchingConfig | None = None) -> str:
    batching = batching or BatchingConfig()
    preferred = ""
    if batching.preferred_batch_sizes:
        preferred = f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred_batch_sizes))} ]\n"
    return (
        f'name: "{RANKER_MODEL}"\n'
        'backend: "python"\n'
        f"max_batch_size: {contract.max_batch_size}\n"
        + _tensor_block("input", contract.ranker_inputs())
        + _tensor_block("output", contract.ranker_outputs())
        + "dynamic_batching {\n"
        + preferred
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}\n"
        + f"instance_group [\n  {{\n    count: {batching.instance_count}\n    kind: {kind}\n  }}\n]\n"
    )


def recommend_config(contract: ServingContract, instance_count: int = 2) -> str:
    """Two instances by default: a BLS instance waits on the ranker while the other takes the
    next user, so concurrent users' candidates can meet in the ranker's dynamic batcher."""
    return (
        f'name: "{RECOMMEND_MODEL}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        + _tensor_block("input", contract.recommend_inputs())
        + _tensor_block("output", contract.recommend_outputs())
        + f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
    )


def _feed_tensor(name: str, data_type: str, dims: str, optional: bool = False) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {dims} ]\n' + ("    optional: true\n" if optional else "") + "  }"


def feed_config(parameters: dict[str, str], instance_count: int = 2) -> str:
    """`feed`: one user per request (`max_batch_size: 0`), optional event time and request id.

    Two instances by default, as for `recommend`: while one waits on the ranker the other takes
    the next user. Each instance is its own process with its own store and log connections.
    """
    inputs = [
        _feed_tensor(USER_ID_INPUT, "TYPE_INT64", "1"),
        _feed_tensor(N_INPUT, "TYPE_INT32", "1"),
        _feed_tensor(TS_INPUT, "TYPE_INT64", "1", optional=True),
        _feed_tensor(REQUEST_ID_INPUT, "TYPE_INT64", "1", optional=True),
    ]
    outputs = [
        _feed_tensor(ITEM_IDS_OUTPUT, "TYPE_INT64", "-1"),
        _feed_tensor(SCORES_OUTPUT, "TYPE_FP32", "-1"),
        _feed_tensor(REQUEST_ID_OUTPUT, "TYPE_INT64", "1"),
        _feed_tensor(MODEL_VERSION_OUTPUT, "TYPE_STRING", "1"),
    ]
    return _python_model(FEED_MODEL, inputs, outputs, parameters, instance_count)


def consent_config(parameters: dict[str, str]) -> str:
    """`consent`: one change per request (`gpurec.serve.consent`); one instance: changes are rare."""
    inputs = [
        _feed_tensor(USER_ID_INPUT, "TYPE_INT64", "1"),
        _feed_tensor(PERSONALISATION, "TYPE_BOOL", "1", optional=True),
        _feed_tensor(TRAINING, "TYPE_BOOL", "1", optional=True),
        _feed_tensor(TS_INPUT, "TYPE_INT64", "1", optional=True),
        _feed_tensor(FORGET, "TYPE_BOOL", "1", optional=True),
    ]
    outputs = [
        _feed_tensor(PERSONALISATION, "TYPE_BOOL", "1"),
        _feed_tensor(TRAINING, "TYPE_BOOL", "1"),
        _feed_tensor(TS_INPUT, "TYPE_INT64", "1"),
    ]
    return _python_model(CONSENT_MODEL, inputs, outputs, parameters, 1)


def _python_model(name: str, inputs: list[str], outputs: list[str], parameters: dict[str, str], instance_count: int) -> str:
    params = ",\n".join(
        f'  {{\n    key: "{key}"\n    value: {{ string_value: {json.dumps(value, ensure_ascii=False)} }}\n  }}' for key, value in parameters.items()
    )
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        + "input [\n" + ",\n".join(inputs) + "\n]\n"
        + "output [\n" + ",\n".join(outputs) + "\n]\n"
        + f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
        + (f"parameters [\n{params}\n]\n" if parameters else "")
    )
