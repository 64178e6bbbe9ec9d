"""The evaluator's image tower options and the World v2 evaluator's hard negatives."""

import random

import pytest
import torch

from museum.models.evaluator import Evaluator, ImageEncoder
from museum.models.tokenizer import write_clip_tokenizer
from museum.models.v2 import pretrain as P
from museum.world.v2 import render


def test_a_full_resolution_stem_reads_64x64_first_and_round_trips(tmp_path):
    tokenizer = write_clip_tokenizer(render.vocabulary(), tmp_path / "tok", 48)
    evaluator = Evaluator.create(tokenizer, image_size=64, stem_width=8, width=16)
    first = evaluator.image_encoder.features[0][0]
    assert (first.out_channels, first.stride) == (8, (1, 1))
    evaluator.save_pretrained(tmp_path / "e")
    loaded = Evaluator.from_pretrained(tmp_path / "e")
    pixels = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.image_encoder(pixels), evaluator.eval().image_encoder(pixels))


def test_a_config_without_a_stem_builds_the_strided_layout():
    """Evaluators saved before the option load as they were: no ``stem_width`` in their config."""
    plain = ImageEncoder(width=16, image_size=64)
    assert "stem_width" not in plain.config and plain.features[0][0].stride == (2, 2)
    assert len(plain.features) == 4 and len(ImageEncoder(width=16, image_size=64, stem_width=8).features) == 5
    with pytest.raises(ValueError, match="64x64"):
        ImageEncoder(image_size=32, stem_width=8)


def test_texts_padded_to_the_longest_embed_as_padded_to_the_full_length(tmp_path):
    tokenizer = write_clip_tokenizer(render.vocabulary(), tmp_path / "tok", 48)
    evaluator = Evaluator.create(tokenizer, image_size=64).eval()
    texts = ["a red circle", "on the left a large blue square with dots on a sand background"]
    full = tokenizer(texts, padding="max_length", max_length=48, return_tensors="pt").input_ids
    expected = torch.nn.functional.normalize(evaluator.text_encoder(full).text_embeds, dim=-1)
    assert torch.allclose(evaluator.embed_texts(texts), expected, atol=1e-6)


def test_negatives_change_different_attributes_and_a_pattern_keeps_its_colours():
    rng = random.Random(0)
    kept = 0
    for scene, _ in render.base_samples(300, seed=7, pair_fraction=0.0):
        drop = render.caption_drop(rng)
        kinds = P.negative_kinds(scene, rng, 3, drop)
        assert len(set(kinds)) == len(kinds) == min(3, len(P.perturbable(scene, drop)))
        captions = {render.caption(P.perturb(scene, rng, drop, kind), drop=drop) for kind in kinds}
        assert render.caption(scene, drop=drop) not in captions
        other = P.perturb(scene, rng, kind="pattern")
        assert other.look.pattern != scene.look.pattern
        if len(scene.look.palette) > 1:  # a pattern of that many colours exists: only the pattern words differ
            assert other.look.palette == scene.look.palette
            kept += 1
    assert kept > 100
