"""The all-rows sparse coder and dictionary learner give scikit-learn's answers (its per-row lasso is the reference)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.decomposition import DictionaryLearning, sparse_encode

from core.analysis.sparse_coding import PositiveDictionaryLearning, positive_lasso_codes


def _planted(n: int, F: int, K: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative rows mixing a few of K sparse non-negative atoms, with a little noise; and the atoms."""
    rng = np.random.default_rng(seed)
    atoms = np.abs(rng.standard_normal((K, F))) * (rng.random((K, F)) < 0.3)
    codes = np.abs(rng.standard_normal((n, K))) * (rng.random((n, K)) < 0.3)
    return codes @ atoms + 0.01 * np.abs(rng.standard_normal((n, F))), atoms


def _cost(X: np.ndarray, codes: np.ndarray, D: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * ((X - codes @ D) ** 2).sum(1) + alpha * np.abs(codes).sum(1)


def _reference(X: np.ndarray, D: np.ndarray, alpha: float) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha, positive=True, max_iter=1000)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0])
def test_codes_are_scikit_learns_lasso_solutions(alpha):
    X, atoms = _planted(300, 40, 8)
    D = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    ours, unconverged = positive_lasso_codes(X, D, alpha)
    ref = _reference(X, D, alpha)
    assert unconverged == 0 and (ours >= 0).all()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert (_cost(X, ours, D, alpha) <= _cost(X, ref, D, alpha) + 1e-7 * (X ** 2).sum(1)).all()


def test_repeated_and_empty_atoms_still_give_optimal_codes():
    """Two identical atoms (no unique solution) and an all-zero one: every row's cost is scikit-learn's."""
    X, atoms = _planted(200, 30, 6, seed=1)
    D = np.vstack([atoms, atoms[:1], np.zeros((1, 30))])
    D[:-1] /= np.linalg.norm(D[:-1], axis=1, keepdims=True)
    ours, _ = positive_lasso_codes(X, D, 0.1)
    ref = _reference(X, D, 0.1)
    assert np.isfinite(ours).all() and (ours >= 0).all() and (ours[:, -1] == 0).all()
    np.testing.assert_allclose(_cost(X, ours, D, 0.1), _cost(X, ref, D, 0.1), rtol=1e-6)


def test_a_zero_row_gets_zero_codes_and_a_warm_start_changes_nothing():
    X, atoms = _planted(50, 20, 5, seed=2)
    X[3] = 0.0
    D = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    cold, _ = positive_lasso_codes(X, D, 0.1)
    warm, _ = positive_lasso_codes(X, D, 0.1, init=cold + 0.5)
    assert (cold[3] == 0).all()
    np.testing.assert_allclose(warm, cold, atol=1e-6)


@pytest.mark.parametrize("n, F, K, seed", [(300, 8, 8, 1), (400, 64, 16, 3)])
def test_the_learned_dictionary_is_scikit_learns(n, F, K, seed):
    """Iteration for iteration; the learning is not convex, so codes that differ within the lasso's tolerance can lead
    to another local optimum: of 5 planted 300 x 8 problems, one ended 0.3% lower in cost than scikit-learn's."""
    X, _ = _planted(n, F, K, seed=seed)
    kw = dict(alpha=0.1, max_iter=40, random_state=42)
    ours = PositiveDictionaryLearning(K, transform_alpha=0.1, **kw).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DictionaryLearning(K, fit_algorithm="cd", transform_algorithm="lasso_cd", transform_alpha=0.1,
                                 positive_code=True, positive_dict=True, **kw).fit(X)
        ref_codes = ref.transform(X)
    assert ours.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(ours.components_, ref.components_, atol=1e-4)
    np.testing.assert_allclose(ours.transform(X), ref_codes, atol=1e-3)
    assert ours.error_[-1] <= ref.error_[-1] * (1 + 1e-6)


def test_convergence_warnings_are_counted_and_others_still_shown():
    from sklearn.exceptions import ConvergenceWarning

    from core.analysis.sparse_coding import counted_convergence_warnings

    with pytest.warns(UserWarning, match="other"):
        with counted_convergence_warnings() as unconverged:
            warnings.warn("no", ConvergenceWarning)
            warnings.warn("no", ConvergenceWarning)
            warnings.warn("other", UserWarning)
    assert unconverged == [2]
