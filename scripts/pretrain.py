"""Train the embedded model and the evaluator from scratch on the rendered world.

    python scripts/pretrain.py --out museum/embedded --work .cache/pretrain 2>&1 | tee docs/logs/pretrain.log

Same as ``museum pretrain``. At most ~90 minutes on a 2-core CPU; see museum/models/pretrain.py.
"""

import argparse
from pathlib import Path

from museum.models.pretrain import EVALUATOR_STEPS, UNET_STEPS, VAE_STEPS, pretrain

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="museum/embedded")
    parser.add_argument("--work", default=".cache/pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=["all"], choices=["all", "vae", "evaluator", "unet"])
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--evaluator-steps", type=int, default=EVALUATOR_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--continue-from", type=Path, default=None,
                        help="a trained model folder (e.g. museum/embedded): every stage starts from it "
                             "(the VAE trains its decoder only)")
    parser.add_argument("--pair-fraction", type=float, default=0.0,
                        help="fraction of two-object scenes in the UNet's pretraining set (shipped model: 0)")
    args = parser.parse_args()
    pretrain(args.out, args.work, seed=args.seed, stages=tuple(args.stages), vae_steps=args.vae_steps,
             evaluator_steps=args.evaluator_steps, unet_steps=args.unet_steps, continue_from=args.continue_from,
             pair_fraction=args.pair_fraction)
