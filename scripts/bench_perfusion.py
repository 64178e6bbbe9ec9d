"""Perfusion on the embedded model: composition, the gate curve, and the cost of many loaded concepts.

    python scripts/bench_perfusion.py --out docs/

1. Composition: learn the concepts of ``--pairs`` (default settings) in one museum; for each pair
   and each of its two concepts, the evaluator's image alignment to the concept's references of
   "a <a> circle and a <b> square on a {bg} background" (a style is named as ", <s> style")
   against the prompt with only the other concept (4 backgrounds x 4 seeds).
2. Gate sweep: for each of ``--gate-concepts`` (one trained concept each), its evaluation prompts
   drawn on a grid of gate bias beta x temperature tau; image alignment (fidelity) against text
   alignment (the rest of the prompt) per point, as a plot (one panel per concept, one line per
   tau) and a table: how far the knobs move between the two without retraining (paper, Fig. 8).
3. Many concepts: a museum with 20 Perfusion concepts loaded against one with 1, generating a
   prompt that names 1 (and 2) of them: the median time ratio over alternating runs.
4. Two-object composition (``--parts two_object_composition``): composition on a base model that
   can draw two objects side by side (``--two-object-base``, default the shipped ``embedded-two-objects``;
   the default ``embedded`` cannot):
   "a small <a> circle on the left and a small <b> square on the right on a {bg} background"
   against the same prompt with the concept's class word in its place; ``--two-object-methods``
   adds other methods' concepts on the same prompts, for comparison.
Writes perfusion.json, images/perfusion_gate.png, images/perfusion_composition.png (each object
pair's prompts: A alone, B alone, both), images/two_objects_{method}.png and two_objects_base.png
(the two-object model without concepts) under --out and
prints the tables; ``--parts`` runs a subset and updates only those entries of an existing
perfusion.json (the default: parts 1-3). (`museum
bench` also draws a beta-only gate curve over all benchmark concepts.)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import matplotlib
import torch

from museum.evaluation.protocol import composition_table, score_concept
from museum.generation.sampling import image_grid
from museum.methods import METHODS, perfusion
from museum.methods.base import generation_settings
from museum.models.loading import EMBEDDED_TWO_OBJECTS, load_evaluator
from museum.museum import Museum
from museum.world.concepts import build_concept
from museum.world.render import INSTANCES

matplotlib.use("Agg")
BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)
TAUS = (0.05, 0.15, 0.3)
PAIRS = ("sunburst:checker", "sunburst:rainbow", "sunburst:sepia", "sunburst:blueprint", "rainbow:sepia",
         "rainbow:blueprint")
PARTS = ("composition", "gate_sweep", "many_concepts", "two_object_composition")
TWO_OBJECT_PAIRS = ("sunburst:rainbow", "sunburst:checker", "gem:rainbow")
# what the two-object base model draws without concepts: two-object prompts, then single-object ones
TWO_OBJECT_BASE_PROMPTS = (
    "a small red circle on the left and a small blue triangle on the right on a sky background",
    "a small yellow star on the left and a small green square on the right on a sand background",
    "a small blue triangle on the left and a small red circle on the right on a night background",
    "a red circle on a sky background",
    "a large purple hexagon with stripes on the left on a grass background",
)


def learn(m: Museum, name: str, concept, images: Path, method: str = "perfusion", **overrides):
    concept.save(images / name)
    return m.learn(name, images / name, method=method, class_word=concept.class_word, progress=False, **overrides)


def timed(m: Museum, prompt: str, n: int) -> float:
    start = time.perf_counter()
    m.generate(prompt, n=n, steps=25)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--runs", type=int, default=7, help="timed runs per setting (median)")
    parser.add_argument("--many", type=int, default=20, help="concepts loaded in the large museum")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="concept pairs A:B to compose")
    parser.add_argument("--gate-concepts", nargs="+", default=["sunburst", "rainbow"], choices=list(INSTANCES),
                        help="concepts of the gate sweep (one plot each)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS[:3]), choices=PARTS)
    parser.add_argument("--two-object-base", default=EMBEDDED_TWO_OBJECTS,
                        help="part two_object_composition: a model pretrained with two-object scenes, a pipeline "
                             f"folder or {EMBEDDED_TWO_OBJECTS} (default)")
    parser.add_argument("--two-object-pairs", nargs="+", default=list(TWO_OBJECT_PAIRS),
                        help="part two_object_composition: object pairs A:B (A drawn on the left)")
    parser.add_argument("--two-object-methods", nargs="+", default=["perfusion"],
                        help="part two_object_composition: the methods whose concepts are composed (one museum each)")
    parser.add_argument("--two-object-gate-temps", nargs="*", type=float, default=[0.15],
                        help="part two_object_composition: Perfusion's table again at each of these gate temperatures")
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    evaluator = load_evaluator()
    work = Path(tempfile.mkdtemp(prefix="museum-perfusion-"))
    path = args.out / "perfusion.json"
    result: dict = json.loads(path.read_text()) if path.is_file() else {}
    run = {"command": shlex.join(["python", "scripts/bench_perfusion.py", *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.platform()}, torch threads {torch.get_num_threads()}"}
    result.setdefault("runs", {})
    for part in args.parts:
        result["runs"][part] = run
        result[part] = globals()[part](args, evaluator, work)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


def composition(args, evaluator, work: Path) -> list[dict]:
    pairs = [tuple(p.split(":")) for p in args.pairs]
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    concepts = {n: build_concept(n) for n in names}
    m = Museum.init(work / "pairs")
    for name in names:
        learn(m, name, concepts[name], work / "images")
    rows = composition_table(m, pairs, concepts, evaluator, echo=lambda line: print(line, flush=True))
    # what the prompts draw, for the object pairs: A alone, B alone, both (rows of 6 seeds)
    objects = [(a, b) for a, b in pairs if not (concepts[a].is_style or concepts[b].is_style)]
    prompts = [p for a, b in objects for p in (f"a {m.concept(a).phrase} on a sky background",
                                                f"a {m.concept(b).phrase} on a sky background",
                                                f"a {m.concept(a).phrase} and a {m.concept(b).phrase} on a sky background")]
    if prompts:
        (args.out / "images").mkdir(parents=True, exist_ok=True)
        image_grid(m.generate(prompts, n=6, seed=0), cols=6).save(args.out / "images" / "perfusion_composition.png")
    return rows


def two_object_composition(args, evaluator, work: Path) -> dict:
    """Side-by-side composition (``layout="side-by-side"``) on ``--two-object-base`` for each method, and its
    picture: for each pair, rows of 6 seeds for the prompt with both concepts, then with each replaced by
    its class word."""
    pairs = [tuple(p.split(":")) for p in args.two_object_pairs]
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    concepts = {n: build_concept(n) for n in names}
    rows = []
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for i, method in enumerate(args.two_object_methods):
        m = Museum.init(work / f"two-objects-{method}", base=args.two_object_base)
        if i == 0:  # no concept named: the base model's own drawing
            image_grid(m.generate(list(TWO_OBJECT_BASE_PROMPTS), n=6, seed=0), cols=6).save(
                args.out / "images" / "two_objects_base.png")
        for name in names:
            learn(m, name, concepts[name], work / "images", method=method)
        # the table again at each gate temperature, for a method with one (Perfusion), recorded as its tau
        temps = args.two_object_gate_temps if any(o.name == "gate_temp" for o in METHODS[method].generation_options) \
            else []
        for gate in [{}] + [{"tau": t} for t in temps]:
            print(f"{method}, generation gate {gate or 'as stored'}:", flush=True)
            with generation_settings({"gate_temp": gate.get("tau")}):
                rows += [{**row, "gate": gate} for row in composition_table(
                    m, pairs, concepts, evaluator, echo=lambda line: print(line, flush=True), layout="side-by-side")]
        prompts = []
        for a, b in pairs:
            pa, pb = m.concept(a).phrase, m.concept(b).phrase
            for left, right in ((pa, pb), (concepts[a].class_word, pb), (pa, concepts[b].class_word)):
                prompts.append(f"a small {left} on the left and a small {right} on the right on a sky background")
        image_grid(m.generate(prompts, n=6, seed=0), cols=6).save(args.out / "images" / f"two_objects_{method}.png")
        for tau in temps:
            with generation_settings({"gate_temp": tau}):
                image_grid(m.generate(prompts, n=6, seed=0), cols=6).save(
                    args.out / "images" / f"two_objects_{method}_tau{tau:g}.png")
    return {"base": str(args.two_object_base), "rows": rows}


def gate_sweep(args, evaluator, work: Path) -> dict[str, list[dict]]:
    """{concept: [{beta, tau, image_alignment, text_alignment}]}, one trained concept each."""
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg") at the top: no display here

    m = Museum.init(work / "gate")
    sweeps = {}
    fig, axes = plt.subplots(1, len(args.gate_concepts), figsize=(5 * len(args.gate_concepts), 4), squeeze=False)
    for name, ax in zip(args.gate_concepts, axes[0]):
        concept = build_concept(name)
        learn(m, name, concept, work / "images")
        sweep = sweeps[name] = []
        for tau in TAUS:
            for beta in BETAS:
                with perfusion.gate(beta=beta, tau=tau):
                    s = score_concept(m, name, concept, evaluator)
                sweep.append({"beta": beta, "tau": tau, "image_alignment": s.image_alignment,
                              "text_alignment": s.text_alignment})
                print(f"{name} beta {beta} tau {tau}: image alignment {s.image_alignment:.3f}, "
                      f"text alignment {s.text_alignment:.3f}", flush=True)
        for tau in TAUS:
            pts = [p for p in sweep if p["tau"] == tau]
            ax.plot([p["text_alignment"] for p in pts], [p["image_alignment"] for p in pts], "o-", label=f"tau {tau}")
            for p in pts:
                ax.annotate(f"{p['beta']}", (p["text_alignment"], p["image_alignment"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("text alignment (CLIP-T)")
        ax.set_ylabel(f"image alignment to {name} (CLIP-I)")
        ax.set_title(f"Perfusion gate sweep, {name} (labels: beta)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        print(f"\n{name}\n| tau \\ beta | " + " | ".join(str(b) for b in BETAS) + " |\n|---" + "|---" * len(BETAS) + "|")
        for tau in TAUS:
            cells = [f"{p['image_alignment']:.3f} / {p['text_alignment']:.3f}" for p in sweep if p["tau"] == tau]
            print(f"| {tau} | " + " | ".join(cells) + " |")
    fig.tight_layout()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "images" / "perfusion_gate.png", dpi=120)
    return sweeps


def many_concepts(args, evaluator, work: Path) -> dict:
    """Quality does not matter here: a few steps each."""
    names = list(INSTANCES)
    one, many = Museum.init(work / "one"), Museum.init(work / "many")
    base_concepts = {n: build_concept(n, n_train=3) for n in names}
    for i in range(args.many):
        src = names[i % len(names)]
        for museum in ([one, many] if i == 0 else [many]):
            learn(museum, f"c{i:02d}", base_concepts[src], work / "many-images", steps=10)
    prompts = {"1 named": f"a {many.concept('c00').phrase} on a sand background",
               "2 named": f"a {many.concept('c00').phrase} and a {many.concept('c01').phrase} on a sand background"}
    timing = {}
    for label, prompt in prompts.items():
        one_prompt = prompt if label == "1 named" else f"a {one.concept('c00').phrase} on a sand background"
        runs_one, runs_many = [], []
        timed(one, one_prompt, 8), timed(many, prompt, 8)  # warm-up
        for _ in range(args.runs):
            runs_one.append(timed(one, one_prompt, 8))
            runs_many.append(timed(many, prompt, 8))
        ratios = [b / a for a, b in zip(runs_one, runs_many)]
        timing[label] = {"one_loaded_s": runs_one, "many_loaded_s": runs_many, "median_ratio": statistics.median(ratios)}
        print(f"{label}: {args.many} loaded / 1 loaded = {statistics.median(ratios):.3f} (median of {args.runs})",
              flush=True)
    return {"loaded": args.many, "batch": 8, "steps": 25, **timing}


if __name__ == "__main__":
    sys.exit(main())
