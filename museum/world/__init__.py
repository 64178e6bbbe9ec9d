"""The rendered world (:mod:`museum.world.render`) and its customization concepts (:mod:`museum.world.concepts`).

``museum.world.render`` stays the *module* (``from museum.world import render as world``
is how the rest of the package uses it); its ``render`` function is re-exported here as
:func:`render_scene`.
"""

from museum.world import concepts, render
from museum.world.concepts import (
    BENCHMARK_CONCEPTS,
    N_QUICK_PROMPTS,
    OBJECT_TEMPLATES,
    STYLE_SEQUENCE,
    STYLE_TEMPLATES,
    ZERO_SHOT_CONCEPTS,
    Concept,
    ConceptSpec,
    build_concept,
    concept_names,
    format_prompt,
    spec,
    strip_style_slot,
)
from museum.world.render import (
    BACKGROUNDS,
    BASE_STYLES,
    CAPTION_PARTS,
    COLOURS,
    IMAGE_SIZE,
    INSTANCES,
    NOVEL_STYLES,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    base_samples,
    base_vocabulary,
    caption,
    held_out_vocabulary,
    random_scene,
    render_batch,
)
from museum.world.render import render as render_scene

__all__ = [
    "concepts", "render", "render_scene", "Scene", "caption", "random_scene", "base_samples", "render_batch",
    "base_vocabulary", "held_out_vocabulary", "SHAPES", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "PATTERNS",
    "BASE_STYLES", "CAPTION_PARTS", "INSTANCES", "NOVEL_STYLES", "IMAGE_SIZE",
    "ConceptSpec", "Concept", "spec", "build_concept", "concept_names", "format_prompt", "strip_style_slot",
    "OBJECT_TEMPLATES", "STYLE_TEMPLATES", "N_QUICK_PROMPTS", "BENCHMARK_CONCEPTS", "STYLE_SEQUENCE",
    "ZERO_SHOT_CONCEPTS",
]
