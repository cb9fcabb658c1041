"""Descriptor post-processing: L2 normalisation, PCA-whitening and score normalisation.

The D2LV / SSCD test-time recipe is: descriptors -> PCA-whitening (eigen power -0.5, fitted on ~20k
DISC21 *training* images) -> L2 normalisation -> inner-product search -> score normalisation
``score = q.r - beta * mean(top-k q.t over training descriptors t)`` (Douze et al.'s ISC2021 baseline;
D2LV used beta=2, k=10). The bias term penalises "hub" queries that are close to everything.

The descriptor track accepts at most 256 dimensions, so keep ``dim <= 256`` for submitted descriptors
(``dim <= 255`` if the score normalisation is folded into an extra column, see
:func:`fold_score_normalization`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isc.evaluation.search import knn

__all__ = [
    "PCAWhitening",
    "PostProcessing",
    "check_whitening_dim",
    "fold_score_normalization",
    "l2_normalize",
    "normalize_scores",
    "query_bias",
]


def l2_normalize(x: np.ndarray | torch.Tensor, eps: float = 1e-12) -> np.ndarray | torch.Tensor:
    """Scale each row (last axis) to unit L2 norm so inner product = cosine; zero rows stay zero.

    Floating inputs keep their dtype (float32 in -> float32 out); other numpy inputs become float32.
    Torch tensors stay tensors on their device.
    """
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)
    return _l2_normalize_numpy(np.asarray(x), eps)


def _l2_normalize_numpy(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(x.dtype, copy=False)


def _check_finite_rows(x: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} row(s) with NaN or infinite values, first at row {bad[0]}")


def _as_matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _top_components_from_gram(
    x: np.ndarray, mean: np.ndarray, dim: int, eps: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Top ``dim`` covariance eigenpairs from the (n, n) Gram matrix when n < d (e.g. 8192-d descriptors).

    ``Xc Xc^T`` and ``Xc^T Xc`` share their non-zero eigenvalues, and ``v = Xc^T u / sqrt(lambda (n - 1))``
    maps one's unit eigenvectors to the other's: an (n, n) instead of a (d, d) eigendecomposition. Returns
    ``None`` when a kept component has (near-)zero variance, where that map is undefined.
    """
    xc = x.astype(np.float64) - mean
    n = xc.shape[0]
    eigenvalues, u = np.linalg.eigh(xc @ xc.T / (n - 1))
    eigenvalues, u = eigenvalues[::-1][:dim], u[:, ::-1][:, :dim]
    if eigenvalues[-1] <= eps * max(float(eigenvalues[0]), np.finfo(np.float64).tiny):
        return None
    vectors = xc.T @ u / np.sqrt(eigenvalues * (n - 1))
    return eigenvalues, vectors


class PCAWhitening:
    """PCA projection with per-component scaling ``eigenvalue ** eigen_power``.

    ``eigen_power=-0.5`` whitens (D2LV, SSCD): the projected training data has identity covariance in the
    kept dimensions, using the unbiased covariance ``Xc.T @ Xc / (n - 1)``. ``eigen_power=0`` is plain PCA.

    Attributes (numpy): ``mean`` (d,) float64, ``components`` (d, dim) float64 unit eigenvectors sorted by
    decreasing eigenvalue (sign fixed so each column's largest-magnitude entry is positive),
    ``eigenvalues`` (dim,) float64 (after the ``eps`` floor), ``eigen_power`` float.
    Build one with :meth:`fit` or :meth:`load`.
    """

    def __init__(
        self, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray, eigen_power: float
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.eigen_power = float(eigen_power)
        d = self.mean.shape[0]
        if self.components.shape != (d, self.eigenvalues.shape[0]):
            raise ValueError(
                f"inconsistent PCA: mean {self.mean.shape}, components {self.components.shape}, "
                f"eigenvalues {self.eigenvalues.shape}"
            )
        # Folded into one (d, dim) float32 matrix so transform is a single matmul.
        scale = self.eigenvalues**self.eigen_power
        self._projection = (self.components * scale).astype(np.float32)
        self._mean32 = self.mean.astype(np.float32)

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    @classmethod
    def fit(
        cls,
        training: np.ndarray | torch.Tensor,
        dim: int = 256,
        eigen_power: float = -0.5,
        eps: float = 1e-8,
        chunk_size: int = 65536,
    ) -> PCAWhitening:
        """Fit on training descriptors (n, d); the covariance is accumulated in float64, in row chunks.

        ``eps`` floors the eigenvalues at ``eps * largest eigenvalue`` so that (near-)zero variance
        directions (rank-deficient training sets) are not amplified to infinity by a negative power.
        """
        x = _as_matrix(training, "training")
        n, d = x.shape
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dim = int(dim)
        if dim > d:
            raise ValueError(f"PCA dim={dim} exceeds the descriptor dimension d={d}")
        if dim > n:
            raise ValueError(f"PCA dim={dim} exceeds the number of training descriptors n={n}; use more data")
        if n < 2:
            raise ValueError(f"PCA needs at least 2 training descriptors, got {n}")
        _check_finite_rows(x, "training")
        mean = x.sum(axis=0, dtype=np.float64) / n
        found = _top_components_from_gram(x, mean, dim, eps) if n < d else None
        if found is not None:
            eigenvalues, eigenvectors = found
        else:
            cov = np.zeros((d, d), dtype=np.float64)
            for start in range(0, n, chunk_size):
                xc = x[start : start + chunk_size].astype(np.float64) - mean
                cov += xc.T @ xc
            cov /= n - 1
            eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
            eigenvalues = eigenvalues[::-1][:dim]
            eigenvectors = eigenvectors[:, ::-1][:, :dim]
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        pivot = np.abs(eigenvectors).argmax(axis=0)
        signs = np.sign(eigenvectors[pivot, np.arange(dim)])
        eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
        if not eigenvalues[0] > np.finfo(np.float32).tiny:
            raise ValueError(
                f"the {n} training descriptors are all identical: PCA-whitening is undefined "
                "(check the training images, or disable evaluation.whitening)"
            )
        floor = eps * float(eigenvalues[0])
        if eigen_power < 0 and np.any(eigenvalues < floor):
            warnings.warn(
                f"{int(np.sum(eigenvalues < floor))} of the {dim} kept PCA components have (near-)zero variance "
                f"(training set of {n} rows is rank-deficient); their eigenvalues are floored at {floor:.3g}",
                stacklevel=2,
            )
        eigenvalues = np.maximum(eigenvalues, floor)
        return cls(mean, eigenvectors, eigenvalues, eigen_power)

    def transform(self, x: np.ndarray | torch.Tensor, normalize: bool = True) -> np.ndarray:
        """Project descriptors (n, d) -> (n, dim) float32, L2-normalised afterwards unless ``normalize=False``."""
        x = _as_matrix(x, "descriptors")
        if x.shape[1] != self.input_dim:
            raise ValueError(f"descriptors have dimension {x.shape[1]}, PCA was fitted on {self.input_dim}")
        out = (x.astype(np.float32, copy=False) - self._mean32) @ self._projection
        return _l2_normalize_numpy(out) if normalize else out

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``.npz`` atomically (temp file in the same directory, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    mean=self.mean,
                    components=self.components,
                    eigenvalues=self.eigenvalues,
                    eigen_power=np.float64(self.eigen_power),
                )
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAWhitening:
        with np.load(path, allow_pickle=False) as data:
            missing = {"mean", "components", "eigenvalues", "eigen_power"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a saved PCAWhitening (missing {sorted(missing)})")
            return cls(data["mean"], data["components"], data["eigenvalues"], float(data["eigen_power"]))

    def __repr__(self) -> str:
        return f"PCAWhitening(input_dim={self.input_dim}, output_dim={self.output_dim}, eigen_power={self.eigen_power})"


# --------------------------------------------------------------------------------------------------
# score normalisation


def query_bias(
    queries: np.ndarray | torch.Tensor,
    training: np.ndarray | torch.Tensor,
    k: int = 10,
    beta: float = 2.0,
    *,
    block_size: int = 16384,
    **search: Any,
) -> np.ndarray:
    """Per-query bias ``beta * mean(top-k q.t)`` over training descriptors t: (nq,) float32.

    Subtract it from every score of that query (:func:`normalize_scores`); ``training`` must be
    post-processed like the references (same PCA-whitening and normalisation). ``search``: the
    arguments of :func:`isc.evaluation.search.knn` (backend, device, GPU placement).
    """
    n_train = training.shape[0]
    if k > n_train:
        raise ValueError(f"score normalisation k={k} exceeds the number of training descriptors ({n_train})")
    sims, _ = knn(queries, training, k, block_size=block_size, **search)
    return bias_of_neighbours(sims, beta)


def bias_of_neighbours(similarities: np.ndarray, beta: float) -> np.ndarray:
    """``beta * mean`` of each query's (nq, k) top-k training similarities, best first: (nq,) float32. One
    formula for the bias of a single search and of a search merged over training blocks."""
    return (beta * similarities.astype(np.float64).mean(axis=1)).astype(np.float32)


def normalize_scores(
    similarities: np.ndarray, bias: np.ndarray, query_index: np.ndarray | None = None
) -> np.ndarray:
    """Subtract each query's bias from its similarities.

    - kNN matrix: ``similarities`` (nq, k) or (nq,), ``query_index=None`` -> ``similarities - bias[:, None]``
      (padding at ``-inf`` stays ``-inf``).
    - Pairs: ``similarities`` (n,) with ``query_index`` (n,) (as from ``range_search``) ->
      ``similarities - bias[query_index]``.

    Returns an array of the shape of ``similarities``, float32 when both inputs are float32.
    """
    similarities = np.asarray(similarities)
    bias = np.asarray(bias)
    if bias.ndim != 1:
        raise ValueError(f"bias must be one-dimensional (nq,), got shape {bias.shape}")
    if query_index is None:
        if similarities.shape[0] != bias.shape[0]:
            raise ValueError(f"{similarities.shape[0]} rows of similarities for {bias.shape[0]} query biases")
        shaped = bias.reshape((-1,) + (1,) * (similarities.ndim - 1))
        return similarities - shaped
    query_index = np.asarray(query_index)
    if query_index.shape != similarities.shape:
        raise ValueError(f"query_index {query_index.shape} must match similarities {similarities.shape}")
    return similarities - bias[query_index]


def fold_score_normalization(
    queries: np.ndarray, references: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SSCD's trick: append ``-bias`` to each query and ``1`` to each reference, so ``q'.r' = q.r - bias``.

    A plain inner-product search (e.g. the descriptor-track organiser's) then ranks by the normalised
    score. Shapes: (nq, d), (nr, d), (nq,) -> (nq, d + 1), (nr, d + 1), float32. The folded vectors are
    no longer unit-norm; keep ``d <= 255`` for the 256-dimension descriptor track.
    """
    queries = _as_matrix(queries, "queries")
    references = _as_matrix(references, "references")
    bias = np.asarray(bias, dtype=np.float32)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]}, references {references.shape[1]}")
    if bias.shape != (queries.shape[0],):
        raise ValueError(f"bias must have shape ({queries.shape[0]},), got {bias.shape}")
    q = np.concatenate([queries.astype(np.float32, copy=False), -bias[:, None]], axis=1)
    r = np.concatenate(
        [references.astype(np.float32, copy=False), np.ones((len(references), 1), dtype=np.float32)], axis=1
    )
    return q, r


def check_whitening_dim(dim: int | None, descriptor_dim: int) -> None:
    """The one check of the whitening dimension against the descriptor's, before or at fitting."""
    if dim is not None and dim > descriptor_dim:
        raise ValueError(
            f"evaluation.whitening.dim={dim} exceeds the descriptor's {descriptor_dim} dims: lower it"
        )


@dataclass
class PostProcessing:
    """The test-time post-processing of one descriptor set, fitted once on training descriptors.

    :meth:`apply` whitens (when fitted with a ``whitening_dim``) and L2-normalises; :meth:`bias` gives the
    score-normalisation term of already-applied queries against the applied training descriptors
    (``None`` when off). Global matching, every scale and view of the test stage, and the callback all use
    this one object, so the descriptors they compare are processed the same way.
    """

    whitening: PCAWhitening | None = None
    training: np.ndarray | None = None  # applied training descriptors (score normalisation's reference set)
    beta: float | None = None
    k: int = 10
    search: Mapping[str, Any] = field(default_factory=dict)  # knn's backend, device, GPU placement

    @classmethod
    def fit(
        cls,
        training: np.ndarray | None,
        *,
        whitening_dim: int | None = None,
        eigen_power: float = -0.5,
        beta: float | None = None,
        k: int = 10,
        search: Mapping[str, Any] | None = None,
        whitening_rows: np.ndarray | None = None,
        keep_training: bool = True,
    ) -> PostProcessing:
        """Fit PCA-whitening on the raw ``training`` descriptors (n, d) when ``whitening_dim`` is set: on
        its rows ``whitening_rows`` (a sample), or on all. ``keep_training=False``: keep no applied copy
        (the caller computes the score normalisation itself, block by block; :meth:`bias` is then None)."""
        if (whitening_dim or beta) and training is None:
            raise ValueError("whitening and score normalisation need training descriptors")
        whitening = None
        if whitening_dim and training is not None:
            check_whitening_dim(whitening_dim, training.shape[1])
            sample = training if whitening_rows is None else training[whitening_rows]
            whitening = PCAWhitening.fit(sample, dim=whitening_dim, eigen_power=eigen_power)
        post = cls(whitening, None, beta or None, k, dict(search or {}))
        if training is not None and keep_training:
            post.training = post.apply(training)
        return post

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, dim) float32 unit rows: whitened when fitted so, then L2-normalised."""
        x = self.whitening.transform(x) if self.whitening is not None else x
        return np.asarray(l2_normalize(np.ascontiguousarray(x, dtype=np.float32)))

    def bias(self, queries: np.ndarray) -> np.ndarray | None:
        """``beta * mean(top-k q.t)`` per applied query (nq,), or ``None`` without score normalisation."""
        if not self.beta or self.training is None:
            return None
        return query_bias(queries, self.training, k=self.k, beta=self.beta, **self.search)
