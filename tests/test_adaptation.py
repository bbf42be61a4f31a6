import numpy as np
import pandas as pd

from helpers import adaptation


def _regime_table(f1_by_condition: dict) -> pd.DataFrame:
    rows = []
    for (method, transform), f1s in f1_by_condition.items():
        for regime, f1 in zip(["clean", "none", "threshold_only", "full"], f1s):
            rows.append(dict(method=method, category="alpha", transform=transform, severity=3,
                             policy="f1_optimal", regime=regime, f1=f1, fpr=1 - f1))
    return pd.DataFrame(rows)


def test_recovered_shares_skip_conditions_whose_drop_is_within_noise():
    table = _regime_table({
        ("patchcore", "blur"): (0.90, 0.50, 0.80, 0.90),      # drop 0.40: 75 % and 100 % recovered
        ("patchcore", "noise"): (0.90, 0.88, 0.70, 0.95),     # drop 0.02: a ratio of noise, left out
        ("patchcore", "rotation"): (0.90, 0.70, 0.60, 0.80),  # drop 0.20: recalibration hurt (-50 %)
    })
    summary = adaptation.recovery_summary(table, min_drop=0.05).set_index("transform")
    assert abs(summary.loc["blur", "recovered_threshold_only"] - 0.75) < 1e-12
    assert abs(summary.loc["blur", "recovered_full"] - 1.0) < 1e-12
    assert np.isnan(summary.loc["noise", "recovered_threshold_only"]) and np.isnan(summary.loc["noise", "recovered_full"])
    assert abs(summary.loc["rotation", "recovered_threshold_only"] + 0.5) < 1e-12
    assert abs(summary.loc["noise", "drop"] - 0.02) < 1e-12

    medians = adaptation.recovery_medians(summary.reset_index(), by=["method"]).iloc[0]
    assert medians.conditions == 3 and medians.conditions_with_drop == 2
    assert abs(medians.recovered_threshold_only - 0.125) < 1e-12  # median of 0.75 and -0.5, noise excluded
    assert abs(medians.none - 0.70) < 1e-12  # regime F1 medians still use every condition
    assert abs(medians.fpr_none - 0.30) < 1e-12 and abs(summary.loc["rotation", "fpr_full"] - 0.20) < 1e-12

    # With the old threshold the near-zero drop dominates: -9 (0.70 - 0.88) / 0.02.
    loose = adaptation.recovery_summary(table, min_drop=1e-6).set_index("transform")
    assert abs(loose.loc["noise", "recovered_threshold_only"] + 9.0) < 1e-9
