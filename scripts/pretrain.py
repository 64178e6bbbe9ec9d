"""Train the embedded model and the evaluator from scratch on the rendered world.

    python scripts/pretrain.py --out museum/embedded --work .cache/pretrain 2>&1 | tee docs/logs/pretrain.log

Same as ``museum pretrain``. About an hour on a 2-core CPU; see museum/base/pretrain.py.
"""

import argparse

from museum.base.pretrain import pretrain

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="museum/embedded")
    parser.add_argument("--work", default=".cache/pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=["all"], choices=["all", "vae", "evaluator", "unet"])
    parser.add_argument("--unet-steps", type=int, default=3500)
    args = parser.parse_args()
    pretrain(args.out, args.work, seed=args.seed, stages=tuple(args.stages), unet_steps=args.unet_steps)
