"""Is a World v2 evaluator a fair judge? Its readings of renders, where the right answer is known.

    OMP_NUM_THREADS=2 python scripts/check_evaluator_v2.py --evaluator ~/.cache/museum/pretrain-v2/evaluator \
        --out docs/world-v2/evaluator.json

1. **Prompt following on renders**: each captioned attribute of ``--prompts`` held-out scenes (the Foundation
   benchmark's prompts and reading, ``museum.evaluation.prompt_following``) read zero-shot against the caption with
   that attribute set to every value: the ceiling of that benchmark's evaluator reading (issue 21 asks >= 90%).
2. **Recognition on renders**: every concept of every pool drawn in its evaluation prompts' own scenes
   (``Concept.prompt_renders``, the upper anchor of gap closed), each image named by the nearest concept of its pool
   (``concept_fidelity.recognition``, as ``measure_learning_v2.py`` and the benchmark read learned images). No pooled
   concept is in the evaluator's training set, so every pool is zero-shot for it; the benchmark pool's figure is the
   ceiling of the issue's recognition >= 0.8 target.

Nothing is chosen from these numbers; they say what the evaluator's readings can mean. Writes JSON, prints Markdown.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from museum.evaluation import prompt_following as PF
from museum.evaluation.concept_fidelity import recognition, reference_bank
from museum.models.loading import load_evaluator
from museum.world.v2 import concepts as pools
from museum.world.v2 import render

SEED = 12345  # the Foundation benchmark's (scripts/bench_base_model_v2.py): the same held-out prompts


def prompt_following(evaluator, n: int) -> dict[str, dict]:
    scenes = PF.held_out_scenes(n, SEED)
    renders = [render.render(s, SEED + i) for i, s in enumerate(scenes)]
    flags = PF.read_attributes(evaluator, renders, scenes)
    flags["style, styled prompts only"] = PF.read_styled(evaluator, renders, scenes)
    return {a: {"accuracy": sum(f) / len(f), "n": len(f)} for a, f in flags.items()}


def pool_recognition(evaluator, names, per_prompt: int) -> dict[str, float]:
    built = {n: pools.build_concept(n) for n in names}
    bank = reference_bank(evaluator, {n: c.reference_images for n, c in built.items()})
    return {n: recognition(evaluator, c.prompt_renders(quick=True, per_prompt=per_prompt), n, bank)
            for n, c in built.items()}


def table(result: dict) -> str:
    lines = ["| reading on renders | value |", "|---|---|"]
    lines += [f"| {a} | {r['accuracy']:.1%} of {r['n']} |" for a, r in result["prompt_following"].items()]
    for pool, by_concept in result["recognition"].items():
        for kind in ("object", "style"):
            values = [v for n, v in by_concept.items() if pools.spec(n).kind == kind]
            if values:
                lines.append(f"| recognition, {pool} pool, {kind}s ({len(values)}) | {statistics.mean(values):.2f} "
                             f"(lowest {min(values):.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluator", type=Path, default=Path.home() / ".cache/museum/pretrain-v2/evaluator")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--pools", nargs="+", choices=list(pools.POOLS), default=list(pools.POOLS))
    parser.add_argument("--per-prompt", type=int, default=2, help="renders per evaluation prompt and concept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    evaluator = load_evaluator(args.evaluator)
    with torch.no_grad():
        result = {"evaluator": str(args.evaluator), "prompt_following": prompt_following(evaluator, args.prompts),
                  "recognition": {p: pool_recognition(evaluator, pools.POOLS[p], args.per_prompt) for p in args.pools}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
