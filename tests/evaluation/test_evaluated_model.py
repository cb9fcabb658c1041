"""The network as evaluation runs it: D2LV's test-time GeM p and the raw (unnormalised) descriptor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from isc.evaluation.evaluated_model import evaluated_model
from isc.evaluation.matching import match_descriptors
from isc.evaluation.settings import EvaluationSettings, Whitening
from isc.models.descriptor import DescriptorModel
from isc.models.heads import BNNeckHead
from isc.models.pooling import GeM
from isc.models.trunks import Trunk


def _model() -> DescriptorModel:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    trunk = Trunk(body, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return DescriptorModel(trunk, GeM(p=4.25, trainable=True), head=BNNeckHead(8, [16], 6)).eval()


def _by_hand(model: DescriptorModel, images: torch.Tensor, p: float) -> torch.Tensor:
    """GeM with exponent ``p`` written out, then the head's MLP and BN neck, no L2 norm."""
    feature_map = model.trunk((images - 0.5) / 0.25).clamp(min=1e-6)
    pooled = feature_map.pow(p).mean(dim=(2, 3)).pow(1 / p)
    return model.head.neck(model.head.mlp(pooled))  # type: ignore[union-attr,operator]


def _settings(gem_p: float | None = None, raw: bool = False) -> EvaluationSettings:
    return EvaluationSettings(gem_p=gem_p, whitening=Whitening(enabled=True, dim=4, raw=raw))


def test_gem_p_and_raw_give_the_seeds_descriptor_and_leave_the_model_alone() -> None:
    model = _model()
    images = torch.rand(3, 3, 12, 12)
    with torch.no_grad():
        before = model(images)
        tested = evaluated_model(model, _settings(gem_p=3.0, raw=True))(images)
        expected = _by_hand(model, images, 3.0)
        learned = _by_hand(model, images, 4.25)
    torch.testing.assert_close(tested, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tested.norm(dim=1), torch.ones(3), atol=1e-3)  # not L2-normalised
    # the model keeps its learned p and its L2 norm: training and export see it unchanged
    assert float(model.pooling.p.detach()) == 4.25 and model.normalize
    torch.testing.assert_close(before, torch.nn.functional.normalize(learned, dim=1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(images), before)


def test_raw_alone_keeps_the_pooling_and_nothing_set_is_the_model_itself() -> None:
    model = _model()
    images = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        raw = evaluated_model(model, _settings(raw=True))(images)
        torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), model(images))
    assert evaluated_model(model, _settings()) is model
    # raw only matters to a whitening: without one the descriptor is L2-normalised anyway
    no_whitening = dataclasses.replace(_settings(raw=True), whitening=Whitening(enabled=False, raw=True))
    assert evaluated_model(model, no_whitening) is model


def test_a_model_without_pooling_or_norm_to_change_is_refused() -> None:
    with pytest.raises(TypeError, match="evaluation.gem_p=null"):
        evaluated_model(nn.Identity(), _settings(gem_p=3.0))


def test_gem_p_must_be_positive() -> None:
    with pytest.raises(ValueError, match="evaluation.gem_p"):
        EvaluationSettings.from_dict({"gem_p": 0})


def test_raw_whitening_is_the_pca_of_the_raw_vectors_then_l2() -> None:
    """On raw vectors, the matching whitens them as an independent numpy PCA does: centre on the
    training mean, project on the top eigenvectors scaled by eigenvalue^-0.5, L2-normalise."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 5.0, size=12)  # raw BN-neck outputs: unnormalised, uneven per dimension
    training = (rng.normal(size=(200, 12)) * scale).astype(np.float32)
    queries = (rng.normal(size=(5, 12)) * scale).astype(np.float32)
    refs = (rng.normal(size=(7, 12)) * scale).astype(np.float32)
    s = EvaluationSettings(
        whitening=Whitening(enabled=True, dim=4, raw=True),
        score_normalization=dataclasses.replace(EvaluationSettings().score_normalization, enabled=False),
    )
    result = match_descriptors(
        np.array([f"Q{i}" for i in range(5)]),
        queries,
        np.array([f"R{i}" for i in range(7)]),
        refs,
        training,
        settings=s,
    )
    mean = training.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(training - mean, rowvar=False, bias=True))
    top = np.argsort(values)[::-1][:4]
    project = vectors[:, top] / np.sqrt(values[top])
    expected = (queries - mean) @ project
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    signs = np.sign(np.sum(expected * result.query, axis=0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(result.query, expected * signs, atol=1e-4)
