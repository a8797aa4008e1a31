"""The online feature store: the model's inputs at serving time, kept current from the event streams.

    from gpurec.features import open_feature_store
    store = open_feature_store("sqlite:///runs/features.db")      # or "redis://127.0.0.1:6379/0"
    rows = store.read(user_id, candidate_item_ids, ts_ms)          # FeatureRows: dense, sparse ids, consent

Backends: `gpurec.features.sqlite` (embedded default) and `gpurec.features.redis` (production).
The features, their formulas and hashing all come from `gpurec.preprocess.features`.
"""

from gpurec.features.store import FeatureRows, OnlineFeatureStore, WriteResult, open_feature_store

__all__ = ["FeatureRows", "OnlineFeatureStore", "WriteResult", "open_feature_store"]
