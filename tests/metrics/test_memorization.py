import numpy as np
import pandas as pd
import pytest

from moegrok.metrics.memorization import MEMORIZED_ACCURACY, memorization_steps, memorized_since, select_memorized


def reference_memorized_since(losses: dict[int, float], eps: float, delta: float):
    steps = sorted(losses)
    last = losses[steps[-1]]
    for t in steps:
        if all(losses[s] <= eps and abs(losses[s] - last) <= delta for s in steps if s >= t):
            return t
    return None


def test_memorized_since_matches_the_definition():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        curve = np.maximum(rng.normal(1.0, 0.3) * np.exp(-np.arange(8) * rng.uniform(0.1, 1.5)), 0)
        curve += rng.normal(0, 0.02, size=8) * (rng.random() < 0.5)
        rows += [{"sample_id": f"s{i}", "step": 100 * t, "loss": float(v)} for t, v in enumerate(curve)]
    losses = pd.DataFrame(rows)
    got = memorized_since(losses, eps=0.1, delta=0.05)
    for sample_id, part in losses.groupby("sample_id"):
        expected = reference_memorized_since(dict(zip(part["step"], part["loss"], strict=True)), 0.1, 0.05)
        assert (np.isnan(got[sample_id]) and expected is None) or got[sample_id] == expected


def test_select_memorized_picks_eps_for_the_target_fraction():
    rows = []
    for i in range(10):  # sample i settles at loss 0.1 * i + 0.05 from step 1 on
        rows += [{"sample_id": f"s{i}", "group": "g", "step": s, "loss": 5.0 if s == 0 else 0.1 * i + 0.05}
                 for s in range(4)]
    chosen = select_memorized(pd.DataFrame(rows), target_fraction=0.3)
    assert chosen["eps"].iloc[0] == pytest.approx(0.3)  # 0.1 -> 1 of 10, 0.2 -> 2, 0.3 -> 3
    assert chosen["memorized_since"].notna().sum() == 3
    fixed = select_memorized(pd.DataFrame(rows), eps=0.1)
    assert fixed["memorized_since"].notna().sum() == 1


def test_group_memorization_step_by_train_accuracy_else_the_loss_rule():
    metrics = pd.DataFrame({"step": [0, 10, 20] * 2, "group": ["a"] * 3 + ["b"] * 3, "sample_set": "all",
                            "train_accuracy": [0.5, MEMORIZED_ACCURACY, 1.0, 0.1, 0.2, 0.3]})
    memorized = pd.DataFrame({"sample_id": ["b1", "b2", "b3"], "group": "b", "eps": 0.1,
                              "memorized_since": [10.0, 20.0, np.nan]})
    assert memorization_steps(metrics, memorized) == {"a": (10.0, "train_accuracy"), "b": (15.0, "loss_rule")}
    assert memorization_steps(metrics, memorized, memorized_accuracy=1.0)["a"] == (20.0, "train_accuracy")
