from __future__ import annotations

import numpy as np
import pytest
import torch

from isc.evaluation.postprocess import (
    PCAWhitening,
    fold_score_normalization,
    l2_normalize,
    normalize_scores,
    query_bias,
)
from isc.evaluation.search import knn, range_search


def _correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Anisotropic data with well-separated variances so PCA components are well defined."""
    scales = np.linspace(3.0, 0.2, d)
    mixing = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ mixing.T + rng.standard_normal(d)).astype(np.float32)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]])
    assert l2_normalize(x.astype(np.float64)).dtype == np.float64
    t = l2_normalize(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), y, atol=1e-7)


def _svd_reference(x: np.ndarray, dim: int):
    """Independent computation: SVD of the centred data, Xc = U S Vt, eigenvalues S^2 / (n - 1)."""
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    return xc, u[:, :dim], s[:dim], vt[:dim].T


def _align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flip the columns of ``a`` to match the signs of ``b`` (components are defined up to sign)."""
    return a * np.sign(np.sum(a * b, axis=0))


def test_whitening_matches_svd_formula():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 500, 32)
    dim = 12
    pca = PCAWhitening.fit(x, dim=dim, eigen_power=-0.5)
    out = pca.transform(x, normalize=False)
    assert out.shape == (500, dim) and out.dtype == np.float32
    xc, u, s, v = _svd_reference(x, dim)
    n = len(x)
    # Whitened training data = U * sqrt(n - 1): identity covariance with the 1/(n-1) convention.
    expected = u * np.sqrt(n - 1)
    np.testing.assert_allclose(_align_signs(out.astype(np.float64), expected), expected, atol=2e-3)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(dim), atol=2e-4)
    np.testing.assert_allclose(pca.eigenvalues, s**2 / (n - 1), rtol=1e-8)
    # Normalised output is the row-normalised whitened vector.
    normed = pca.transform(x)
    np.testing.assert_allclose(normed, out / np.linalg.norm(out, axis=1, keepdims=True), atol=1e-6)
    # New data goes through the same affine map.
    y = _correlated(rng, 20, 32)
    expected_y = (y - x.astype(np.float64).mean(axis=0)) @ v / (s / np.sqrt(n - 1))
    got_y = pca.transform(y, normalize=False).astype(np.float64)
    np.testing.assert_allclose(_align_signs(got_y, expected_y), expected_y, atol=2e-3)


@pytest.mark.parametrize(("n", "d"), [(40, 96), (30, 31)])
def test_whitening_with_fewer_rows_than_dims_matches_svd_formula(n: int, d: int):
    """n < d takes the (n, n) Gram route: same eigenvalues and whitened vectors as the SVD of the data."""
    rng = np.random.default_rng(1)
    x = _correlated(rng, n, d)
    dim = 10
    pca = PCAWhitening.fit(x, dim=dim, eigen_power=-0.5)
    _, u, s, v = _svd_reference(x, dim)
    np.testing.assert_allclose(pca.eigenvalues, s**2 / (n - 1), rtol=1e-8)
    np.testing.assert_allclose(pca.components.T @ pca.components, np.eye(dim), atol=1e-8)  # orthonormal
    y = _correlated(rng, 7, d)
    expected_y = (y - x.astype(np.float64).mean(axis=0)) @ v / (s / np.sqrt(n - 1))
    got_y = pca.transform(y, normalize=False).astype(np.float64)
    np.testing.assert_allclose(_align_signs(got_y, expected_y), expected_y, atol=2e-3)


def test_identical_training_descriptors_are_refused():
    with pytest.raises(ValueError, match="all identical"):
        PCAWhitening.fit(np.ones((10, 8), dtype=np.float32), dim=4)


def test_eigen_power_zero_is_plain_pca():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 400, 16)
    pca = PCAWhitening.fit(x, dim=5, eigen_power=0.0)
    out = pca.transform(x, normalize=False).astype(np.float64)
    xc, _, _, v = _svd_reference(x, 5)
    expected = xc @ v
    np.testing.assert_allclose(_align_signs(out, expected), expected, atol=1e-4)
    # Components sorted by decreasing variance.
    assert np.all(np.diff(out.var(axis=0)) < 0)


def test_pca_errors():
    rng = np.random.default_rng(2)
    x = _correlated(rng, 50, 8)
    with pytest.raises(ValueError, match="exceeds the descriptor dimension"):
        PCAWhitening.fit(x, dim=9)
    with pytest.raises(ValueError, match="number of training descriptors"):
        PCAWhitening.fit(x[:4], dim=6)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="training has 1 row.*first at row 7"):
        PCAWhitening.fit(bad, dim=4)
    pca = PCAWhitening.fit(x, dim=4)
    with pytest.raises(ValueError, match="dimension 7"):
        pca.transform(x[:, :7])


def test_rank_deficient_training_is_finite():
    rng = np.random.default_rng(3)
    x = _correlated(rng, 6, 8)
    with pytest.warns(UserWarning, match="near-\\)zero variance"):
        pca = PCAWhitening.fit(x, dim=6)
    assert np.all(np.isfinite(pca.transform(x)))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    x = _correlated(rng, 200, 16)
    pca = PCAWhitening.fit(x, dim=8, eigen_power=-0.5)
    path = tmp_path / "sub" / "pca.npz"
    pca.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["pca.npz"]  # no temp file left behind
    loaded = PCAWhitening.load(path)
    for name in ("mean", "components", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(pca, name))
    assert loaded.eigen_power == pca.eigen_power
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))


def _brute_bias(q: np.ndarray, t: np.ndarray, k: int, beta: float) -> np.ndarray:
    sims = np.sort(q.astype(np.float64) @ t.astype(np.float64).T, axis=1)[:, ::-1]
    return beta * sims[:, :k].mean(axis=1)


@pytest.fixture(scope="module")
def sn_data():
    rng = np.random.default_rng(5)
    return _unit(rng, 120, 32), _unit(rng, 400, 32), _unit(rng, 1000, 32)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_query_bias_matches_brute_force(sn_data, backend):
    q, r, t = sn_data
    bias = query_bias(q, t, k=10, beta=2.0, backend=backend, device="cpu")
    assert bias.shape == (120,) and bias.dtype == np.float32
    np.testing.assert_allclose(bias, _brute_bias(q, t, 10, 2.0), atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the number of training"):
        query_bias(q, t[:5], k=10)


def test_normalize_scores_matrix_and_pairs(sn_data):
    q, r, t = sn_data
    bias = query_bias(q, t, k=10, beta=2.0, device="cpu")
    full = q.astype(np.float64) @ r.astype(np.float64).T - _brute_bias(q, t, 10, 2.0)[:, None]
    # kNN matrix form.
    sims, idx = knn(q, r, 8, device="cpu")
    scores = normalize_scores(sims, bias)
    assert scores.shape == (120, 8) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.take_along_axis(full, idx, axis=1), atol=1e-5)
    # Per-pair form (range search output).
    qi, di, s = range_search(q, r, 0.3, device="cpu")
    pair_scores = normalize_scores(s, bias, qi)
    np.testing.assert_allclose(pair_scores, full[qi, di], atol=1e-5)
    # Padding stays -inf.
    padded = normalize_scores(np.array([[0.5, -np.inf]], dtype=np.float32), bias[:1])
    assert np.isneginf(padded[0, 1])
    with pytest.raises(ValueError, match="rows of similarities"):
        normalize_scores(sims[:5], bias)


def test_folded_vectors_give_normalized_scores(sn_data):
    q, r, t = sn_data
    bias = query_bias(q, t, k=10, beta=2.0, device="cpu")
    qf, rf = fold_score_normalization(q, r, bias)
    assert qf.shape == (120, 33) and rf.shape == (400, 33) and qf.dtype == np.float32
    np.testing.assert_allclose(qf @ rf.T, normalize_scores(q @ r.T, bias), atol=1e-5)
    # A plain inner-product search on folded vectors ranks by the normalised score.
    sims, idx = knn(qf, rf, 5, device="cpu")
    ref_sims, ref_idx = knn(q, r, 5, device="cpu")  # same ranking: bias is constant per query
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, normalize_scores(ref_sims, bias), atol=1e-5)
