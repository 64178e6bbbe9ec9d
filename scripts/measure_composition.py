"""Composition in any museum: does a prompt naming two concepts draw each of them?

    python scripts/measure_composition.py museum-bench/c-lora/museum sunburst:rainbow [--json OUT]

For each pair A:B of benchmark-world concepts learned in the museum (any method), prints the
evaluator's image alignment of each concept to its references in "a <A> ... and a <B> ... on a
{bg} background" against the prompt with only the other concept (``museum.evaluation.protocol.
score_composition``: 4 backgrounds x 4 seeds). Composition works when "with both" is higher.
``--layout side-by-side`` scores "a small <A> ... on the left and a small <B> ... on the right" instead,
for a base model pretrained with two-object scenes (scripts/pretrain.py --pair-fraction).
"""

import argparse
import json
from pathlib import Path

import diffusers

from museum.evaluation.protocol import LAYOUTS, composition_table
from museum.models.loading import load_evaluator
from museum.museum import Museum
from museum.world.concepts import build_concept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("museum", type=Path)
    parser.add_argument("pairs", nargs="+", help="A:B, concept names of the rendered world")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--layout", choices=LAYOUTS, default="together")
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    m, evaluator = Museum.open(args.museum), load_evaluator()
    pairs = [tuple(p.split(":")) for p in args.pairs]
    concepts = {n: build_concept(n) for pair in pairs for n in pair}
    rows = composition_table(m, pairs, concepts, evaluator, echo=lambda line: print(line, flush=True),
                             layout=args.layout)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
