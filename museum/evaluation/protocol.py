"""Scoring a learned concept the way the continual protocol does (METHODS.md): the one path every measurement
of a concept goes through (the scripts, the tests and ``museum bench``, which adds its own metrics to
:func:`alignment` in ``museum.evaluation.benchmark.metrics``).

For concept j, the evaluation prompts are the concept's templates filled with the museum's
phrase for it ("<sunburst> circle", or "<v3>" for C-LoRA), drawn with fixed seeds (:func:`seeded`); the base
row fills them with the class word (or drops the style) and draws with the base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from museum.evaluation.metrics import image_alignment, text_alignment
from museum.generation.sampling import generate_images
from museum.models import icgen
from museum.world.concepts import N_QUICK_PROMPTS, Concept, format_prompt


@dataclass
class ConceptScore:
    image_alignment: float
    text_alignment: float
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def seeded(prompts: Sequence[str], n_seeds: int) -> tuple[list[str], list[int]]:
    """The (prompt, seed) pairs every image of the protocol is drawn from: each prompt with seeds 0..n_seeds-1, in
    the order ``Museum.generate(prompts, n=n_seeds, seed=0)`` draws them."""
    return [p for p in prompts for _ in range(n_seeds)], [s for _ in prompts for s in range(n_seeds)]


def evaluation_prompts(concept: Concept, phrase: str, n_prompts: int = N_QUICK_PROMPTS) -> list[str]:
    return [format_prompt(t, phrase) for t in concept.prompts[:n_prompts]]


def class_prompts(concept: Concept, n_prompts: int, n_seeds: int) -> list[str]:
    """The class prompt each evaluation image is scored against, in drawing order (prompt k, seeds 0..n_seeds-1)."""
    return seeded(concept.class_prompts()[:n_prompts], n_seeds)[0]


def concept_images(museum, name: str, concept: Concept, *, n_prompts: int, n_seeds: int, steps: int,
                   guidance: float) -> list:
    """The concept drawn from the museum: evaluation prompt k with seeds 0..n_seeds-1."""
    prompts = evaluation_prompts(concept, museum.concept(name).phrase, n_prompts)
    return museum.generate(prompts, n=n_seeds, seed=0, steps=steps, guidance=guidance)


def base_images(pipe, concept: Concept, *, n_prompts: int, n_seeds: int, steps: int, guidance: float) -> list:
    """The "base" row's images: the class prompts drawn by the untouched base model, same seeds."""
    prompts, seeds = seeded(concept.class_prompts()[:n_prompts], n_seeds)
    return generate_images(pipe, prompts, seeds=seeds, steps=steps, guidance=guidance)


def alignment(evaluator, images, concept: Concept, prompts: list[str]) -> ConceptScore:
    """Image alignment to the concept's held-out references, text alignment to ``prompts`` (one per image)."""
    return ConceptScore(image_alignment(evaluator, images, concept.reference_images),
                        text_alignment(evaluator, images, prompts), len(images))


def score_concept(museum, name: str, concept: Concept, evaluator, *, n_prompts: int = N_QUICK_PROMPTS,
                  n_seeds: int = 2, steps: int = 25, guidance: float = 7.5) -> ConceptScore:
    """Generate the concept from the museum (prompt k, seeds 0..n_seeds-1) and score it."""
    images = concept_images(museum, name, concept, n_prompts=n_prompts, n_seeds=n_seeds, steps=steps,
                            guidance=guidance)
    return alignment(evaluator, images, concept, class_prompts(concept, n_prompts, n_seeds))


def score_base(pipe, concept: Concept, evaluator, *, n_prompts: int = N_QUICK_PROMPTS, n_seeds: int = 2,
               steps: int = 25, guidance: float = 7.5) -> ConceptScore:
    """The "base" row: the class prompts drawn by the untouched base model, same seeds."""
    images = base_images(pipe, concept, n_prompts=n_prompts, n_seeds=n_seeds, steps=steps, guidance=guidance)
    return alignment(evaluator, images, concept, class_prompts(concept, n_prompts, n_seeds))


COMPOSITION_BACKGROUNDS = ("sand", "sky", "grass", "night")


@dataclass
class CompositionScore:
    """Image alignment to concept ``a`` of a prompt naming both concepts and of one naming only ``b``."""
    with_both: float
    with_other_only: float

    def to_dict(self) -> dict:
        return asdict(self)


LAYOUTS = ("together", "side-by-side")


def score_composition(museum, a: str, b: str, concepts: dict[str, Concept], evaluator, *, n_seeds: int = 4,
                      steps: int = 25, guidance: float = 7.5, layout: str = "together") -> dict[str, CompositionScore]:
    """Does a prompt naming two concepts draw each of them? (issue: Perfusion, "Composition").

    For each of ``a`` and ``b``: the image alignment to its references of a prompt naming both against
    that of the prompt without it, on 4 backgrounds. ``layout`` "together": "a <a> and a <b> on a {bg}
    background" against "a <b> on a {bg} background" (styles named as "..., <s> style"); "side-by-side"
    (objects only; the world's two-object captions): "a small <a> circle on the left and a small <b>
    triangle on the right on a {bg} background" against the same prompt with the concept's class word
    in its place ("a small circle on the left and ..."). Any method's museum works.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "side-by-side" and (concepts[a].is_style or concepts[b].is_style):
        raise ValueError(f"side-by-side composition needs two objects; {a} + {b} includes a style")

    def together(names, bg):
        parts = [(None, f"{p} style") if concepts[n].is_style else (f"a {p}", None)
                 for n, p in ((n, museum.concept(n).phrase) for n in names)]
        objects = [o for o, _ in parts if o] or ["a scene"]
        return " and ".join(objects) + f" on a {bg} background" + "".join(f", {s}" for _, s in parts if s)

    def side_by_side(phrases, bg):
        return f"a small {phrases[0]} on the left and a small {phrases[1]} on the right on a {bg} background"

    out = {}
    for this, other in ((a, b), (b, a)):
        scores = []
        for named in (True, False):
            if layout == "together":
                prompts = [together((this, other) if named else (other,), bg) for bg in COMPOSITION_BACKGROUNDS]
            else:
                phrase = {n: museum.concept(n).phrase for n in (a, b)}
                if not named:
                    phrase[this] = concepts[this].class_word
                prompts = [side_by_side((phrase[a], phrase[b]), bg) for bg in COMPOSITION_BACKGROUNDS]
            images = museum.generate(prompts, n=n_seeds, seed=0, steps=steps, guidance=guidance)
            scores.append(image_alignment(evaluator, images, concepts[this].reference_images))
        out[this] = CompositionScore(*scores)
    return out


def composition_table(museum, pairs, concepts: dict[str, Concept], evaluator, echo=print, **scoring) -> list[dict]:
    """:func:`score_composition` (with ``scoring``: n_seeds, steps, guidance) for every (a, b) of ``pairs``,
    echoed as markdown rows as they come (the tables of docs/METHODS.md); returns the rows as dicts."""
    methods = {c.name: c.method for c in museum.concepts}
    echo("| pair | concept | method | alignment, prompt with both | alignment, prompt with only the other |\n"
         "|---|---|---|---|---|")
    rows = []
    for a, b in pairs:
        for name, s in score_composition(museum, a, b, concepts, evaluator, **scoring).items():
            rows.append({"pair": [a, b], "concept": name, "method": methods[name], **s.to_dict()})
            echo(f"| {a} + {b} | {name} | {methods[name]} | {s.with_both:.3f} | {s.with_other_only:.3f} |")
    return rows


def zero_shot_alignment(pipe, evaluator, concept, *, scale: float = 1.0, n_prompts: int = 8, n_seeds: int = 2,
                        steps: int = 25, guidance: float = 7.5) -> float:
    """Image alignment to ``concept``'s held-out references of its class prompts ("a hexagon on a sand background")
    drawn with the concept's TRAINING images as context and no training; ``pipe`` holds an adapter
    (``icgen.load_adapter``). Same prompts and seeds as :func:`score_base`."""
    pipe.set_ip_adapter_scale(scale)
    context = icgen.context_embeddings(evaluator, concept.train_images)
    prompts, seeds = seeded(concept.class_prompts()[:n_prompts], n_seeds)
    images = []
    for i in range(0, len(prompts), 16):
        batch = prompts[i:i + 16]
        images += generate_images(pipe, batch, seeds=seeds[i:i + 16], steps=steps, guidance=guidance,
                                  **icgen.context_kwargs(context, len(batch), guidance > 1))
    return image_alignment(evaluator, images, concept.reference_images)
