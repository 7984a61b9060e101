"""The measurement arithmetic of bench/plan_regret.py: Spearman's rho, regret, errors, the stopping rule."""

from __future__ import annotations

import itertools

import pytest

from autopar.cost_models.profiling.fidelity import is_stable, ranks_of, regret, relative_error, spearman, spread


def _rho_by_formula(x, y):
    """Spearman's closed form without ties: 1 − 6·Σd² / (n(n²−1))."""
    rx, ry = ranks_of(x), ranks_of(y)
    n = len(x)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def test_spearman_matches_the_closed_form_on_every_permutation_of_five():
    base = [0.3, 0.1, 0.5, 0.2, 0.4]
    for perm in itertools.permutations([1.0, 2.0, 3.0, 4.0, 5.0]):
        assert spearman(base, list(perm)) == pytest.approx(_rho_by_formula(base, list(perm)))


def test_spearman_with_ties_and_bad_input():
    assert ranks_of([2.0, 1.0, 2.0]) == [2.5, 1.0, 2.5]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    with pytest.raises(ValueError):
        spearman([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_regret_and_errors():
    assert regret(1.0, [1.0, 2.0]) == 0.0
    assert regret(1.5, [1.0, 1.5, 3.0]) == pytest.approx(0.5)
    assert relative_error(90.0, 100.0) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        regret(1.0, [0.0, 1.0])


def test_stopping_rule_and_spread():
    assert not is_stable([1.0] * 5, window=5, tolerance=0.03)  # needs one more sample than the window
    assert is_stable([1.0] * 6, window=5, tolerance=0.03)
    assert not is_stable([1.0, 1.0, 1.0, 1.0, 2.0, 3.0], window=3, tolerance=0.03)
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.5 - 1.5) / 3.0)


def test_minimum_stopping_rule():
    from autopar.cost_models.profiling.fidelity import min_is_stable

    assert not min_is_stable([1.0, 1.0], window=2, tolerance=0.03)  # needs a sample before the window
    assert min_is_stable([1.0, 1.5, 1.2], window=2, tolerance=0.03)
    assert not min_is_stable([1.0, 1.5, 0.9], window=2, tolerance=0.03)  # the last window lowered it by 10 %
