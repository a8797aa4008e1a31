"""Feature hashing is the same in Polars, numpy and Python, and never changes."""

import numpy as np
import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from gpurec.data.hashing import hash_id, hash_ids_expr, hash_ids_np, hash_string, string_hash_table

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
