"""The independent fidelity reading (no learned model) and gap closed."""

import math

import numpy as np

from museum.evaluation.independent import colour_similarity, gap_closed, independent_fidelity, patch_similarity
from museum.world.v2 import concepts


def test_identical_images_read_as_one():
    images = concepts.build_concept("checker", n_train=3, n_ref=0).train_images
    assert np.allclose(colour_similarity(images[:1], images[:1]), 1.0)
    assert np.allclose(patch_similarity(images[:1], images[:1]), 1.0, atol=1e-3)  # cdist rounding
    assert math.isclose(independent_fidelity(images[:1], images[:1])["colour"], 1.0, rel_tol=1e-5)


def test_a_concepts_own_images_read_closer_than_another_concepts():
    """Both terms rank a concept's held-out training images above another concept's of the same class."""
    sunburst = concepts.build_concept("sunburst", n_train=4, n_ref=8)
    smiley = concepts.build_concept("smiley", n_train=4, n_ref=0)  # also a circle
    own = independent_fidelity(sunburst.train_images, sunburst.reference_images)
    other = independent_fidelity(smiley.train_images, sunburst.reference_images)
    assert own["colour"] > other["colour"] and own["patches"] > other["patches"]


def test_gap_closed():
    assert math.isclose(gap_closed(0.5, 0.2, 0.8), 0.5)
    assert gap_closed(0.2, 0.2, 0.8) == 0.0
    assert gap_closed(0.1, 0.2, 0.8) < 0
    assert math.isnan(gap_closed(0.5, 0.3, 0.3))
