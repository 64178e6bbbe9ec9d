"""The independent fidelity reading (no learned model) and gap closed."""

import math

import random
from dataclasses import replace

import numpy as np

from museum.evaluation.concept_fidelity import Fidelity, GapClosed
from museum.evaluation.independent import MIN_GAP, colour_similarity, gap_closed, independent_fidelity, patch_similarity
from museum.world.v2 import concepts
from museum.world.v2.render import random_look, render


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
    assert math.isnan(gap_closed(0.5, 0.3, 0.3 + MIN_GAP / 2))  # too small a gap to divide by


def test_prompt_renders_read_closer_than_other_looks_in_the_same_scenes():
    """The upper anchor beats what a base model drawing the class word could: other looks of the same
    shape in the very same scenes."""
    concept = concepts.build_concept("checker", n_train=1, n_ref=8)
    renders = concept.prompt_renders(quick=True, per_prompt=1)
    rng = random.Random(1)
    others = [render(replace(concept._scene_for(scene, rng), look=replace(random_look(rng), shape="square")), i)
              for i, scene in enumerate(concept.prompt_scenes[:concepts.N_QUICK_PROMPTS])]
    upper = independent_fidelity(renders, concept.reference_images)["fidelity"]
    assert upper > independent_fidelity(others, concept.reference_images)["fidelity"] + 0.05


def test_gap_closed_per_reading_reports_a_missing_gap_as_nan():
    gap = GapClosed(learned=Fidelity(0.5, 0.5), class_prompt=Fidelity(0.3, 0.3), upper=Fidelity(0.7, 0.3 + MIN_GAP / 2))
    assert math.isclose(gap.evaluator(), 0.5) and math.isnan(gap.independent())
    assert set(gap.to_dict()) == {"learned", "class_prompt", "upper", "gap_closed"}
