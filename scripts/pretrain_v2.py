"""Pretrain the World v2 embedded model in resumable chunks (see museum/base/v2/pretrain.py).

    OMP_NUM_THREADS=2 python scripts/pretrain_v2.py --minutes 60

Stages run in order (render the VAE's set, vae, evaluator, render the rest, unet), each resumed where
the last call stopped; ``--minutes`` bounds the whole call. Run the same command in a later session
to continue. Checkpoints stay under --work (outside git); the log is appended to
docs/logs/pretrain-v2.log.
"""

import argparse
import time
from pathlib import Path

import torch

from museum.base.v2 import pretrain as P

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/museum/pretrain-v2")
    parser.add_argument("--minutes", type=float, default=60.0, help="time budget of this call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("docs/logs/pretrain-v2.log"))
    args = parser.parse_args()
    deadline = time.time() + 60 * args.minutes
    left = lambda: max(0.0, (deadline - time.time()) / 60)  # noqa: E731
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    vae_paths = P.render_chunks(args.work, P.N_VAE, args.seed, logfile=args.log)
    images = P.load_images(vae_paths)
    vae = P.train_vae(args.work, images, minutes=left(), seed=args.seed, logfile=args.log)
    scenes = [s for i in range(len(vae_paths)) for s in P.chunk_scenes(i, args.seed)]
    evaluator = None
    if vae is not None:
        evaluator = P.train_evaluator(args.work, images, scenes, minutes=left(), seed=args.seed, logfile=args.log)
    if evaluator is not None:
        del images
        paths = P.render_chunks(args.work, P.N_BASE, args.seed, minutes=left(), logfile=args.log)
        if all(p.exists() for p in paths):
            scenes = [s for i in range(len(paths)) for s in P.chunk_scenes(i, args.seed)]
            P.train_unet(args.work, vae, paths, scenes, minutes=left(), seed=args.seed, logfile=args.log)
