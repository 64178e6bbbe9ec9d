"""Train the embedded model's image-context adapter (ICGen, museum/models/icgen.py) once on the base world.

    OMP_NUM_THREADS=1 python scripts/train_icgen.py --out museum/embedded/icgen --log docs/logs/icgen.json

Data (base vocabulary only: no held-out instance or style is rendered): ``--objects`` random base scenes; each
object (colour, shape, pattern) is rendered ``--views`` times in new settings (background, position, size; plain
style). A training sample takes one view as the target and the mean evaluator embedding of the other views as the
context, so the context shows the object and never the target's setting. The target's caption keeps its
background, position and size and names the object by its shape only (half the samples), by colour and shape
(a quarter) or fully (a quarter): the context must carry what the words leave out. The context is dropped (zero
embedding) for ``--drop`` of the samples, the unconditional branch of guidance.

Only the adapter trains (the projection to 4 context tokens and each cross-attention block's to_k_ip / to_v_ip);
the UNet, text encoder, VAE and the evaluator's image tower stay frozen. Deterministic by ``--seed``.
"""

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from museum.models import icgen
from museum.models.loading import EMBEDDED, EMBEDDED_EVALUATOR, load_evaluator, load_pipeline
from museum.plumbing.objectives import denoising_loss, diffusion_target, encode_prompts
from museum.world.render import BACKGROUNDS, POSITIONS, SIZES, base_samples, caption, render, replace


def views(scene, rng: random.Random, n: int):
    """``n`` settings of the scene's object: new background, position and size, plain style."""
    return [replace(scene, background=rng.choice(BACKGROUNDS), position=rng.choice(list(POSITIONS)),
                    size=rng.choice(list(SIZES)), style="none") for _ in range(n)]


def object_caption(scene, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        phrase = scene.shape
    elif r < 0.75:
        phrase = f"{scene.colour} {scene.shape}"
    else:
        return caption(scene, drop=frozenset({"style"}))
    return caption(scene, object_phrase=phrase, drop=frozenset({"style"}))


@torch.no_grad()
def build_data(pipe, evaluator, objects: int, n_views: int, seed: int):
    rng = random.Random(seed)
    scenes, images, captions = [], [], []
    for i, (scene, render_seed) in enumerate(base_samples(objects, seed=seed)):
        vs = views(scene, rng, n_views)
        scenes.append(vs)
        images += [render(v, render_seed * 31 + k) for k, v in enumerate(vs)]
        captions.append([object_caption(v, rng) for v in vs])
    embeds = evaluator.embed_images(images).float().reshape(objects, n_views, -1)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    latents = torch.cat([pipe.vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    latents = (latents * pipe.vae.config.scaling_factor).reshape(objects, n_views, *latents.shape[1:])
    return latents, embeds, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2048)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--drop", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", default=EMBEDDED, help="diffusers pipeline folder (default: the embedded model)")
    parser.add_argument("--evaluator", default=EMBEDDED_EVALUATOR, help="evaluator folder (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=Path("museum/embedded/icgen"))
    parser.add_argument("--log", type=Path, default=Path("docs/logs/icgen.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    pipe, evaluator = load_pipeline(args.pipeline), load_evaluator(args.evaluator)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae, evaluator):
        module.requires_grad_(False)
    latents, embeds, captions = build_data(pipe, evaluator, args.objects, args.views, args.seed)
    data_seconds = time.time() - start
    print(f"data: {args.objects} objects x {args.views} views in {data_seconds:.0f} s", flush=True)
    params = icgen.install(pipe.unet, embeds.shape[-1])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    for step in range(args.steps):
        obj = torch.randint(0, args.objects, (args.batch,), generator=gen)
        target = torch.randint(0, args.views, (args.batch,), generator=gen)
        others = torch.ones(args.batch, args.views)
        others[torch.arange(args.batch), target] = 0
        context = torch.nn.functional.normalize((embeds[obj] * others[..., None]).sum(1), dim=-1)
        context = context * (torch.rand(args.batch, 1, generator=gen) >= args.drop)
        x0 = latents[obj, target]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        with torch.no_grad():
            text = encode_prompts(pipe, [captions[o][v] for o, v in zip(obj.tolist(), target.tolist())])
        pred = pipe.unet(sched.add_noise(x0, noise, t), t, text, added_cond_kwargs={"image_embeds": [context[:, None]]}).sample
        loss = denoising_loss(pred, diffusion_target(sched, x0, noise, t))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(log[-100:]):.4f} ({time.time() - start:.0f} s)", flush=True)
    path = icgen.save_adapter(pipe.unet, args.out)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 python scripts/train_icgen.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - start,
        "data_seconds": data_seconds, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "loss_per_100_steps": [float(np.mean(log[i:i + 100])) for i in range(0, len(log), 100)],
        "weights": str(path), "bytes": path.stat().st_size}, indent=2))
    print(f"saved {path} ({path.stat().st_size} bytes) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
