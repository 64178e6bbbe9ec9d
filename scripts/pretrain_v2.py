"""Pretrain the World v2 embedded model in resumable chunks (see museum/models/v2/pretrain.py).

    OMP_NUM_THREADS=2 python scripts/pretrain_v2.py --minutes 60

Stages run in order (render the VAE's set, vae, render the rest, unet, evaluator, icgen), each resumed where
the last call stopped; ``--minutes`` bounds the whole call. Run the same command in a later session
to continue. Checkpoints stay under --work (outside git); the log is appended to
docs/logs/pretrain-v2.log.

``--stage evaluator`` runs the evaluator stage alone (it does not need the UNet), so that it can train beside
the UNet, one thread and one core each (a UNet step of 64 takes 3.4 s on two threads and 5.2 s on one):

    OMP_NUM_THREADS=1 taskset -c 0 python scripts/pretrain_v2.py --minutes 60 &
    OMP_NUM_THREADS=1 taskset -c 1 python scripts/pretrain_v2.py --minutes 60 --stage evaluator
"""

import argparse
from pathlib import Path

import torch

from museum.models.v2 import pretrain as P

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/museum/pretrain-v2")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget of this call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("docs/logs/pretrain-v2.log"))
    parser.add_argument("--stage", choices=["all", "evaluator"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = P.pretrain_evaluator if args.stage == "evaluator" else P.pretrain
    run(args.work, minutes=args.minutes, seed=args.seed, logfile=args.log)
