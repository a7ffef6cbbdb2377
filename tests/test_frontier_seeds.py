"""bench/frontier_seeds.py's interval over seeds: Student t on the per-seed differences, given the items. A
seeded simulation of per-seed differences D_s = mu + a_s (training randomness, normal; the validation items are
fixed, so their effect is part of mu) shows its coverage with 3 and 5 seeds."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from frontier_seeds import t_interval  # noqa: E402


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_over_seeds_covers_the_mean_difference(seeds):
    rng = random.Random(1234 + seeds)
    mu, draws, covered = 0.05, 2000, 0
    for _ in range(draws):
        _, low, high, p = t_interval([mu + rng.gauss(0, 0.02) for _ in range(seeds)])
        covered += low <= mu <= high
    assert 0.93 <= covered / draws <= 0.97


def test_p_value_agrees_with_the_interval():
    mean, low, high, p = t_interval([0.01, 0.03, 0.02])
    assert (p < 0.05) == (low > 0 or high < 0) and low < mean < high
    assert math.isnan(t_interval([0.02, 0.02, 0.02])[3])  # no spread: no p-value
