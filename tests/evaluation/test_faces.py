"""The offline face detector that flags references for the seed's face removal (combine.py:28-48)."""

from __future__ import annotations

import numpy as np
import pytest
from view_images import sample

from isc.evaluation.faces import FaceSettings, detect_faces
from isc.evaluation.inference import ReferenceCrops
from isc.evaluation.settings import EvaluationSettings
from isc.evaluation.views import reference_views


def test_the_cascade_finds_the_astronauts_face_and_none_elsewhere():
    faces = detect_faces(sample("astronaut"))
    assert faces.dtype == np.int64 and faces.shape == (1, 4)
    x0, y0, x1, y1 = faces[0]
    # Eileen Collins' face lies about x 180-270, y 65-160 of the 512 x 512 photo
    assert 150 < (x0 + x1) / 2 < 260 and 80 < (y0 + y1) / 2 < 150 and 60 < x1 - x0 < 140
    for name in ("coffee", "rocket", "chelsea"):
        assert detect_faces(sample(name)).shape == (0, 4)
    # minSize above the face's ~95 px: nothing
    assert detect_faces(sample("astronaut"), FaceSettings(min_size=200)).shape == (0, 4)


def test_reference_crops_mark_face_references_after_their_18_crops():
    image = sample("astronaut")
    crops = reference_views(512, 512, crops=True)[1:]
    assert ReferenceCrops()(image) == crops  # off by default: the crops alone
    marked = ReferenceCrops(FaceSettings(enabled=True))(image)
    assert marked[:18] == crops and [v.kind for v in marked[18:]] == ["face"]
    assert ReferenceCrops(FaceSettings(enabled=True))(sample("coffee")) == reference_views(600, 400)[1:]


def test_face_settings_are_parsed_and_checked_with_their_config_path():
    s = EvaluationSettings.from_dict({"local_verification": {"reference_faces": {"enabled": True}}})
    assert s.local_verification.reference_faces == FaceSettings(enabled=True)
    assert EvaluationSettings().local_verification.reference_faces.enabled is False
    key = "evaluation.local_verification.reference_faces"
    with pytest.raises(ValueError, match=f"{key}.scale_factor"):
        EvaluationSettings.from_dict({"local_verification": {"reference_faces": {"scale_factor": 1.0}}})
    with pytest.raises(ValueError, match=f"{key}.min_size"):
        FaceSettings(min_size=0)
    with pytest.raises(ValueError, match=f"{key}.min_neighbors"):
        FaceSettings(min_neighbors=-1)
    with pytest.raises(ValueError, match=f"unknown key.*{key}.bogus"):
        EvaluationSettings.from_dict({"local_verification": {"reference_faces": {"bogus": 1}}})
    with pytest.raises(ValueError, match=f"{key}.enabled=false"):
        EvaluationSettings.from_dict({"local_verification": {"reference_faces": True}})


def test_every_packaged_cascade_finds_the_astronaut_and_the_cascade_is_part_of_the_cache_key():
    from isc.evaluation.extract import _views_key
    from isc.evaluation.faces import CASCADE, CASCADES

    assert CASCADE == "haarcascade_frontalface_alt.xml"  # the measured choice of docs/inference.md
    for cascade in CASCADES:
        (box,) = detect_faces(sample("astronaut"), FaceSettings(cascade=cascade))
        assert 150 < (box[0] + box[2]) / 2 < 260 and 80 < (box[1] + box[3]) / 2 < 150
    # faces found by one cascade are never served from the shard cache for another
    keys = {_views_key(ReferenceCrops(FaceSettings(enabled=True, cascade=c))) for c in CASCADES}
    assert len(keys) == len(CASCADES)
    with pytest.raises(ValueError, match="reference_faces.cascade must be one of"):
        FaceSettings(cascade="haarcascade_eye.xml")
