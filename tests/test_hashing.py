"""Feature hashing is the same in Polars, numpy and Python, and never changes."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpurec.client import hash_raw
from gpurec.data.hashing import (
    PAD_FOLD_ID,
    PAD_ID,
    feature_salt,
    hash_id,
    hash_ids_expr,
    hash_ids_np,
    hash_raw_values,
    hash_string,
    splitmix64,
    string_hash_table,
)
from gpurec.data.hashing_core import _GOLDEN, _M1, _M2, to_signed
from gpurec.data.schema import ITEMS, USERS
from gpurec.errors import InvalidInput
from gpurec.preprocess.dims import build_dimensions
from gpurec.serve.contract import ServingContract, hash_raw_features

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(int64s, min_size=1, max_size=50), st.sampled_from(["user_id", "item_id", "author_id"]))
def test_polars_numpy_and_python_agree(values, feature):
    arr = np.array(values, dtype=np.int64)
    expected = [hash_id(v, feature) for v in values]
    assert hash_ids_np(arr, feature).tolist() == expected
    polars = pl.DataFrame({"x": arr}).select(hash_ids_expr(pl.col("x"), feature)).to_series()
    assert polars.to_list() == expected


def test_values_are_pinned():
    # Changing the hash silently would orphan every trained embedding row: pin known values.
    assert hash_id(0, "user_id") == -6040171936892455320
    assert hash_id(123456789, "user_id") == 8689833138381465142
    assert hash_string("us", "region") == 392217810916697345


def test_features_are_salted_apart():
    assert hash_id(7, "user_id") != hash_id(7, "author_id")
    assert hash_string("en", "user_language") != hash_string("en", "item_language")


def test_string_hash_table_maps_distinct_values():
    table = string_hash_table(["b", "a", "b", None], "tag")
    assert table["value"].to_list() == ["a", "b"]
    assert table["value_hash"].to_list() == [hash_string("a", "tag"), hash_string("b", "tag")]


# ---- the padding id is never a hashed id, on every path ---------------------------------------

_MOD = 1 << 64


def _unxorshift(y: int, shift: int) -> int:
    x = y
    for _ in range(64 // shift + 1):
        x = y ^ (x >> shift)
    return x


def raw_id_hashing_to(target: int, feature: str) -> int:
    """The int64 id whose unfolded hash is `target`: splitmix64 is a bijection, so invert it."""
    x = _unxorshift(target % _MOD, 31)
    x = _unxorshift(x * pow(_M2, -1, _MOD) % _MOD, 27)
    x = _unxorshift(x * pow(_M1, -1, _MOD) % _MOD, 30)
    return to_signed(((x - _GOLDEN) % _MOD) ^ feature_salt(feature))


def test_a_value_hashing_to_the_padding_id_gets_the_fold_id_everywhere():
    value = raw_id_hashing_to(PAD_ID, "user_id")
    assert to_signed(splitmix64((value % _MOD) ^ feature_salt("user_id"))) == PAD_ID  # the raw hash is -1
    assert PAD_FOLD_ID != PAD_ID
    assert hash_id(value, "user_id") == PAD_FOLD_ID
    assert hash_ids_np(np.array([value, 0]), "user_id").tolist() == [PAD_FOLD_ID, hash_id(0, "user_id")]
    frame = pl.DataFrame({"x": [value, None]}, schema={"x": pl.Int64})
    assert frame.select(hash_ids_expr(pl.col("x"), "user_id")).to_series().to_list() == [PAD_FOLD_ID, None]
    assert hash_raw_values([value], "user_id", "int").tolist() == [PAD_FOLD_ID]


def test_preprocessing_and_serving_agree_on_the_folded_id():
    """A user and an author whose ids hash to the padding id: the dimension tables (preprocessing)
    and the serving hasher both give PAD_FOLD_ID, and a multi-valued serving row keeps it."""
    user_id, author_id = raw_id_hashing_to(PAD_ID, "user_id"), raw_id_hashing_to(PAD_ID, "author_id")
    users = pa.Table.from_pylist(
        [{"user_id": user_id, "region": "us", "device": "ios", "language": "en", "signup_ts": 0,
          "consent_personalisation": True, "consent_training": True}],
        schema=USERS,
    )
    items = pa.Table.from_pylist(
        [{"item_id": 1, "author_id": author_id, "duration_ms": 1000, "upload_ts": 0, "hashtags": ["a"],
          "language": "en", "region": "us"}],
        schema=ITEMS,
    )
    dims = build_dimensions(users, items)
    assert dims.users["sparse_user_id"].to_list() == [PAD_FOLD_ID]
    assert dims.items["sparse_author_id"].to_list() == [PAD_FOLD_ID]
    contract = ServingContract(
        ("a",), ("user_id",), ("author_ids",), ("like",), {"like": 1.0}, 4,
        raw_hashing={"user_id": "int", "author_ids": "int"},
    )
    hashed = hash_raw_features(contract, {"user_id": [user_id], "author_ids": [[raw_id_hashing_to(PAD_ID, "author_ids"), 5]]})
    assert hashed["user_id"].tolist() == [[PAD_FOLD_ID]]
    assert hashed["author_ids"].tolist() == [[PAD_FOLD_ID, hash_id(5, "author_ids")]]
    client = hash_raw(contract, {"author_ids": [raw_id_hashing_to(PAD_ID, "author_ids")]}, per_candidate=False)
    assert client["author_ids"] == [PAD_FOLD_ID]  # not dropped as padding


# ---- raw hashing rules ---------------------------------------------------------------------------


def test_raw_rules_hash_like_the_scheme_and_refuse_what_they_do_not_take():
    assert hash_raw_values([7, np.int64(8)], "user_id", "int").tolist() == [hash_id(7, "user_id"), hash_id(8, "user_id")]
    assert hash_raw_values(["en"], "user_language", "string").tolist() == [hash_string("en", "user_language")]
    assert hash_raw_values([0, 23], "hour", "hour").tolist() == [hash_id(0, "hour"), hash_id(23, "hour")]
    assert hash_raw_values([], "hour", "hour").dtype == np.int64
    for values, rule, message in [
        (["7"], "int", "integer ids"),
        ([None], "int", "integer ids"),
        ([None], "string", "strings"),
        ([True], "int", "integer ids"),
        ([2**64], "int", "64-bit"),
        ([3], "string", "strings"),
        ([24], "hour", "hour of day 0-23"),
        ([-1], "hour", "hour of day 0-23"),
        ([1.0], "hour", "hours of day"),
        ([1], "float", "unknown raw hashing rule"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            hash_raw_values(values, "f", rule)
