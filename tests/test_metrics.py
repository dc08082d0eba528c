"""Metric functions against hand-computed examples, and the inequalities the lab relies on."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_lab.evaluation import metrics as M


def test_entropy_kl_tv_by_hand():
    assert M.entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    assert M.entropy([1.0, 0.0]) == 0.0  # 0 log 0 = 0
    assert M.binary_entropy(0.5) == pytest.approx(math.log(2))
    assert M.kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert M.kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert M.kl([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert M.tv([1, 0], [0, 1]) == 1.0
    assert M.tv([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25)


def test_entropy_upper_bound_is_entropy_of_uniform_fill():
    # p = (0.5) on |A| = 1 of V = 3 tokens: the rest 0.5 spread over 2 tokens → H(0.5, 0.25, 0.25) = 1.5 log 2
    assert M.entropy_upper_bound([0.5], 3) == pytest.approx(1.5 * math.log(2))
    p = [0.3, 0.2, 0.1]
    assert M.entropy_upper_bound(p, 10) == pytest.approx(M.entropy(p + [0.4 / 7] * 7))
    assert M.entropy_upper_bound([0.25] * 4, 10) == pytest.approx(math.log(4))  # M = 1: no missing mass
    assert M.entropy_upper_bound([0.7, 0.3 + 1e-12], 10) == pytest.approx(M.entropy([0.7, 0.3]))  # M > 1 by rounding
    assert math.isnan(M.entropy_upper_bound([0.1, 0.1], 2))  # V ≤ |A| with mass missing: undefined


@pytest.mark.parametrize("kl,bound", [(0.01, 0.58), (0.1, 1.56), (0.5, 3.0), (1.0, 3.86)])
def test_fannes_bound_from_kl_matches_references(kl, bound):
    """docs/references.md: d = 101, |ΔH| ≤ T log(d−1) + h(T), T = √(KL/2)."""
    assert M.fannes_entropy_bound(M.pinsker_tv_bound(kl), 101) == pytest.approx(bound, abs=0.01)


def test_caps():
    assert M.pinsker_tv_bound(0.02) == pytest.approx(0.1)
    assert M.pinsker_tv_bound(10.0) == 1.0
    assert M.fannes_entropy_bound(1.0, 101) == pytest.approx(math.log(101))  # saturates at log d
    assert M.fannes_entropy_bound(0.5, 2) == pytest.approx(math.log(2))
    assert M.fannes_entropy_bound(0.0, 101) == 0.0


distributions = st.integers(2, 12).flatmap(
    lambda d: st.tuples(*[st.lists(st.floats(1e-3, 1.0), min_size=d, max_size=d)] * 2))


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_pinsker_and_fannes_hold(pq):
    p, q = (np.array(x) / sum(x) for x in pq)
    assert M.kl(p, p) == pytest.approx(0.0, abs=1e-12)
    kl, t = M.kl(p, q), M.tv(p, q)
    assert t <= M.pinsker_tv_bound(kl) + 1e-12
    assert abs(M.entropy(p) - M.entropy(q)) <= M.fannes_entropy_bound(t, len(p)) + 1e-9
    assert abs(M.entropy(p) - M.entropy(q)) <= M.fannes_entropy_bound(M.pinsker_tv_bound(kl), len(p)) + 1e-9
    # the exact decomposition ΔH = −KL − Σ(p − q)·log q, and the cross term vanishes against uniform q
    assert M.entropy(p) - M.entropy(q) == pytest.approx(-kl - M.entropy_cross_term(p, q), abs=1e-9)
    assert M.entropy_cross_term(p, np.full(len(p), 1 / len(p))) == pytest.approx(0.0, abs=1e-12)


def test_entropy_cross_term_by_hand():
    # q = (1/2, 1/4, 1/4), p = (1, 0, 0): (1/2)·log(1/2) − (1/4)·log(1/4)·2 = −½log2 + log2 = ½log2
    assert M.entropy_cross_term([1, 0, 0], [0.5, 0.25, 0.25]) == pytest.approx(0.5 * np.log(2))


def test_sequence_entropy_and_se():
    h, se = M.sequence_entropy([-1.0, -3.0])
    assert (h, se) == (pytest.approx(2.0), pytest.approx(1.0))  # s = √2, SE = √2/√2


def test_distinct_n():
    samples = [[1, 2, 3], [1, 2, 4]]
    assert M.distinct_n(samples, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(samples, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert math.isnan(M.distinct_n([[1]], 2))


@pytest.mark.parametrize("tokens,loop", [
    ([1, 2, 1, 2, 1, 2], True),
    ([1, 2, 1, 2, 3], False),  # only twice
    ([5] * 6, True),  # (5, 5) three times
    ([5] * 5, False),
    ([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 9], True),
    ([1, 2, 3, 4, 5, 6], False),
])
def test_repetition_loop(tokens, loop):
    assert M.has_repetition_loop(tokens) is loop


def test_repetition_loop_rate():
    assert M.repetition_loop_rate([[1, 2] * 3, [1, 2, 3], [4] * 8, [1]]) == 0.5


def test_ece_and_brier_by_hand():
    # bins of width 0.1: {0.82, 0.88} → acc 0.5, conf 0.85; {0.25} → acc 0, conf 0.25
    assert M.ece([0.82, 0.88, 0.25], [True, False, False]) == pytest.approx(2 / 3 * 0.35 + 1 / 3 * 0.25)
    assert M.ece([1.0, 1.0, 0.5, 0.5], [True, True, True, False]) == pytest.approx(0.0)
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.5² + 0.5²) = 0.5
    assert M.brier([[0.7, 0.2, 0.1], [0.5, 0.5]], [0, 1]) == pytest.approx(0.32)


def test_registry():
    assert M.METRICS["fannes_entropy_bound"] is M.fannes_entropy_bound
