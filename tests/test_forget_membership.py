"""Membership inference before and after forgetting (gpurec.privacy.membership), on a real model.

Three seeds of the experiment on the small world (about 7 s each): forgotten users F and kept
users K trained on, non-members N never. Measured (tests/configs/small.toml, 4 epochs, seeds
0-2): loss-attack AUC of F vs N 0.64 / 0.61 / 0.74 before forgetting, 0.56 / 0.53 / 0.59 after
`Trainer.forget`, 0.45 / 0.46 / 0.54 for a model retrained without F; the user-row attack 0.99-1.0
before and exactly 0.5 after. The residue above the retrain is the shared weights' trace.
"""

from __future__ import annotations

import statistics

from conftest import SMALL_CONFIG

from gpurec.privacy.membership import membership_experiment
from gpurec.sync.examples import examples_from_features
from gpurec.train.config import load_configs


def test_forgetting_removes_what_the_user_rows_remember_and_most_of_the_loss_attacks_edge(small_features):
    model_config, train_config = load_configs(SMALL_CONFIG)
    examples = examples_from_features(small_features, "train")
    results = [membership_experiment(small_features, model_config, train_config, seed, 4, examples) for seed in range(3)]
    for r in results:
        print(r)
        assert r.users_per_group >= 50
        assert r.row_auc_before > 0.9  # the user rows memorise their users
        assert r.row_auc_after_forget == 0.5  # and after forgetting hold nothing of them
    before = statistics.mean(r.loss_auc_before for r in results)
    after = statistics.mean(r.loss_auc_after_forget for r in results)
    retrained = statistics.mean(r.loss_auc_retrained for r in results)
    assert before > 0.6  # the attack works on the trained model
    assert before > after + 0.05  # forgetting takes most of its edge away
    assert abs(after - 0.5) < 0.1 and abs(retrained - 0.5) < 0.1
    assert after >= retrained - 0.02  # what is left is the shared weights' trace, not less than a retrain
