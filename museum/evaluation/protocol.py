"""Scoring a learned concept the way the continual protocol does (METHODS.md).

For concept j, the evaluation prompts are the concept's templates filled with the museum's
phrase for it ("<sunburst> circle", or "<v3>" for C-LoRA), drawn with fixed seeds; the base
row fills them with the class word (or drops the style) and draws with the base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from museum.evaluation.metrics import image_alignment, text_alignment
from museum.generation.sampling import generate_images
from museum.world.concepts import N_QUICK_PROMPTS, Concept, format_prompt


@dataclass
class ConceptScore:
    image_alignment: float
    text_alignment: float
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_prompts(concept: Concept, phrase: str, n_prompts: int = N_QUICK_PROMPTS) -> list[str]:
    return [format_prompt(t, phrase) for t in concept.prompts[:n_prompts]]


def _score(evaluator, images, concept: Concept, n_prompts: int, n_seeds: int) -> ConceptScore:
    class_prompts = [p for p in concept.class_prompts()[:n_prompts] for _ in range(n_seeds)]
    return ConceptScore(image_alignment(evaluator, images, concept.reference_images),
                        text_alignment(evaluator, images, class_prompts), len(images))


def score_concept(museum, name: str, concept: Concept, evaluator, *, n_prompts: int = N_QUICK_PROMPTS,
                  n_seeds: int = 2, steps: int = 25, guidance: float = 7.5) -> ConceptScore:
    """Generate the concept from the museum (prompt k, seeds 0..n_seeds-1) and score it."""
    prompts = evaluation_prompts(concept, museum.concept(name).phrase, n_prompts)
    images = museum.generate(prompts, n=n_seeds, seed=0, steps=steps, guidance=guidance)
    return _score(evaluator, images, concept, n_prompts, n_seeds)


def score_base(pipe, concept: Concept, evaluator, *, n_prompts: int = N_QUICK_PROMPTS, n_seeds: int = 2,
               steps: int = 25, guidance: float = 7.5) -> ConceptScore:
    """The "base" row: the class prompts drawn by the untouched base model, same seeds."""
    prompts = [p for p in concept.class_prompts()[:n_prompts] for _ in range(n_seeds)]
    seeds = [s for _ in range(n_prompts) for s in range(n_seeds)]
    images = generate_images(pipe, prompts, seeds=seeds, steps=steps, guidance=guidance)
    return _score(evaluator, images, concept, n_prompts, n_seeds)
