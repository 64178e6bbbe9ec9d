"""Foundation quality benchmark of a base model: does it draw what the prompt says?

    python scripts/bench_base_model.py                      # the embedded model, writes docs/BASE_MODEL.md
    python scripts/bench_base_model.py --pipeline PATH --evaluator PATH --out /tmp/bench
    python scripts/bench_base_model.py --sweep 1 3 5 7.5 10 # also read a guidance sweep

What it does:

1. Draws ``--prompts`` held-out base scenes (``random.Random(12345)``, not pretraining's
   seeds 0/1), restricted to style "none" and pattern "plain" so the reading is about
   shape, colour and background, and captions them with ``render.caption``.
2. Generates one image per prompt with the pipeline (batches of 16, one seeded
   ``torch.Generator`` per image, so an image does not depend on its batch).
3. Reads every image zero-shot with the evaluator: for each attribute (shape, colour,
   background) the candidates are the prompt's caption with that attribute swapped for
   every value of its vocabulary (the rest kept); accuracy is the fraction where
   ``evaluator.classify`` picks the prompt's own value. The same reading on real renders
   of the same scenes is the evaluator's own accuracy: an upper bound that separates
   generator errors from evaluator errors.
4. Reads ``--two-objects`` held-out two-object prompts for placement: is each object's colour
   in its own half of the image (``museum.evaluation.placement``)?
5. Times a batch of 16 images at ``--steps`` steps (median of ``--timing-runs`` runs after
   one warm-up).
6. Writes ``BASE_MODEL.md``, ``base_model.json`` and ``images/base_samples.png`` /
   ``images/base_renders.png`` (8 prompts x 4 seeds) / ``images/base_two_objects.png`` (4 x 4),
   nearest-neighbour upscaled x4, under
   ``--out``, and prints the table. Exits 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from museum.generation.sampling import generate_images, image_grid  # noqa: E402
from museum.evaluation.placement import COLOUR_GAP, MIN_PIXELS, NEAR, read_placement, readable_pairs  # noqa: E402
from museum.models.loading import EMBEDDED, EMBEDDED_EVALUATOR, load_evaluator, load_pipeline, resolution  # noqa: E402
from museum.world.render import (  # noqa: E402
    BACKGROUNDS, COLOURS, SHAPES, Scene, caption, random_scene, render, render_batch,
)

HELD_OUT_SEED = 12345  # pretraining draws its scenes from seeds 0 (base set) and 1 (evaluator set)
BATCH = 16
TARGET = 0.90
GRID_PROMPTS, GRID_SEEDS, GRID_SCALE = 8, 4, 4
ATTRIBUTES = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
}


# --------------------------------------------------------------------------- prompts


def held_out_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[Scene, int]]:
    """``n`` (scene, render-seed) pairs: random base scenes with style "none" and pattern "plain"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = replace(random_scene(rng, base_styles=False), pattern="plain", style="none")
        out.append((scene, seed * 1_000_003 + i))
    return out


def swapped_captions(scene: Scene, attribute: str) -> list[str]:
    """The scene's caption with ``attribute`` set to every value of its vocabulary, in vocabulary order."""
    return [caption(replace(scene, **{attribute: value})) for value in ATTRIBUTES[attribute]]


def read_attributes(evaluator, images: np.ndarray, scenes: list[Scene]) -> dict[str, list[str]]:
    """Zero-shot reading: for each attribute, the evaluator's pick among the swapped captions, per image."""
    readings = {}
    for attribute, values in ATTRIBUTES.items():
        picks = evaluator.classify(images, [swapped_captions(s, attribute) for s in scenes])
        readings[attribute] = [values[k] for k in picks]
    return readings


def accuracies(readings: dict[str, list[str]], scenes: list[Scene]) -> dict[str, dict]:
    result = {}
    hits_all = np.ones(len(scenes), bool)
    for attribute, picks in readings.items():
        hits = np.array([p == getattr(s, attribute) for p, s in zip(picks, scenes)])
        hits_all &= hits
        result[attribute] = {"accuracy": float(hits.mean()), "correct": int(hits.sum()), "n": len(scenes),
                             "chance": 1.0 / len(ATTRIBUTES[attribute])}
    result["all three"] = {"accuracy": float(hits_all.mean()), "correct": int(hits_all.sum()), "n": len(scenes),
                           "chance": float(np.prod([1.0 / len(v) for v in ATTRIBUTES.values()]))}
    return result


# --------------------------------------------------------------------------- generation


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float) -> np.ndarray:
    """(N, size, size, 3) uint8; image i is drawn from ``seeds[i]`` (``museum.generation.generate_images``)."""
    images = generate_images(pipe, prompts, seeds=seeds, steps=steps, guidance=guidance, batch_size=BATCH)
    return np.stack([np.asarray(im) for im in images])


def image_seed(seed: int, prompt_index: int, k: int = 0) -> int:
    return seed * 1_000_000 + prompt_index * 100 + k


def time_batch(pipe, prompts: list[str], *, steps: int, guidance: float, device: str, runs: int) -> list[float]:
    """Seconds per batch of 16 prompts (after one untimed warm-up)."""
    batch = (prompts * BATCH)[:BATCH]
    seeds = list(range(BATCH))
    generate(pipe, batch, seeds, steps=steps, guidance=guidance)  # warm-up
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(pipe, batch, seeds, steps=steps, guidance=guidance)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------- figures


def grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """Rows of ``GRID_SEEDS`` uint8 HxWx3 tiles -> one image, tiles upscaled x``GRID_SCALE``, row numbers on the left."""
    tiles = [Image.fromarray(tile) for row in rows for tile in row]
    return image_grid(tiles, cols=GRID_SEEDS, scale=GRID_SCALE, pad=2, numbered=True)


def pose_variants(scene: Scene, k: int, seed: int) -> list[Scene]:
    """The scene and ``k - 1`` re-posed copies (rotation/jitter are not captioned: all match the caption)."""
    rng = random.Random(seed)
    out = [scene]
    for _ in range(k - 1):
        out.append(replace(scene, rotation=rng.uniform(-20, 20) if scene.shape != "circle" else 0.0,
                           jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))))
    return out


# --------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def results_table(gen: dict, vae: dict, ren: dict) -> str:
    lines = ["| attribute | generated accuracy | VAE round-trip accuracy | renders accuracy | target >= 90% |",
             "|---|---|---|---|---|"]
    for attribute in [*ATTRIBUTES, "all three"]:
        g, v, r = gen[attribute], vae[attribute], ren[attribute]
        met = "met" if g["accuracy"] >= TARGET else "not met"
        if attribute == "all three":
            met = "(joint, no target)"
        lines.append(f"| {attribute} | {pct(g['accuracy'])} ({g['correct']}/{g['n']}) | "
                     f"{pct(v['accuracy'])} ({v['correct']}/{v['n']}) | "
                     f"{pct(r['accuracy'])} ({r['correct']}/{r['n']}) | {met} |")
    return "\n".join(lines)


def error_budget(gen: dict, vae: dict, ren: dict) -> str:
    """Split each attribute's misses into evaluator, VAE and UNet parts (renders -> round-trip -> generated)."""
    lines = ["| attribute | evaluator misses (100% - renders) | lost in the VAE (renders - round-trip) | "
             "lost in the UNet (round-trip - generated) |", "|---|---|---|---|"]
    for attribute in ATTRIBUTES:
        g, v, r = (x[attribute]["accuracy"] for x in (gen, vae, ren))
        lines.append(f"| {attribute} | {pct(1 - r)} | {pct(r - v)} | {pct(v - g)} |")
    if any(x[a]["accuracy"] > y[a]["accuracy"] for a in ATTRIBUTES for x, y in ((gen, vae), (vae, ren))):
        lines.append("\nA negative loss means the later stage's images are read better than the earlier stage's (e.g. "
                     "generated better than round-trip renders). A likely reading, not measured: the renders include "
                     "every rotation and jitter of the held-out scenes, the generator draws shapes in common poses.")
    return "\n".join(lines)


@torch.no_grad()
def vae_round_trip(pipe, images: np.ndarray, device: str) -> np.ndarray:
    """Encode and decode renders with the pipeline's VAE (latent mean): what the latent space can hold."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    out = []
    for i in range(0, len(x), 64):
        latents = pipe.vae.encode(x[i:i + 64]).latent_dist.mean
        out.append(pipe.vae.decode(latents).sample.clamp(-1, 1))
    rec = torch.cat(out).add(1.0).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return rec


def sweep_table(sweep: list[dict]) -> str:
    cols = [*ATTRIBUTES, "all three"]
    lines = ["| guidance | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in sweep:
        lines.append(f"| {row['guidance']:g} | " + " | ".join(pct(row["accuracy"][c]["accuracy"]) for c in cols) + " |")
    return "\n".join(lines)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "diffusers": __import__("diffusers").__version__,
    }


def timing_line(r: dict) -> str:
    a, t, m = r["args"], r["timing"], r["machine"]
    if not t["runs_s"]:
        return f"**Timing**: not measured (`--timing-runs 0`); torch.get_num_threads() = {m['torch_num_threads']}."
    return (f"**Timing**: a batch of 16 images at {a['steps']} steps (guidance {a['guidance']:g}) takes\n"
            f"**{t['median_s']:.2f} s** (median of {len(t['runs_s'])} runs after one warm-up; runs:\n"
            f"{', '.join(f'{x:.2f}' for x in t['runs_s'])} s) on {a['device']} with "
            f"torch.get_num_threads() = {m['torch_num_threads']}.")


def two_objects_section(two: dict | None) -> str:
    if not two:
        return ""
    pair_captions = "\n".join(f"{i + 1}. {p['caption']}" for i, p in enumerate(two["per_prompt"][:GRID_PROMPTS // 2]))
    placed, drawn = f"{pct(two['placed'] / two['n'])} ({two['placed']}/{two['n']})", \
        f"{pct(two['both_drawn'] / two['n'])} ({two['both_drawn']}/{two['n']})"
    return f"""
## Two objects side by side

{two['n']} held-out two-object prompts ("{two['per_prompt'][0]['caption']}":
`render.random_pair_scene` from `random.Random({HELD_OUT_SEED + 1})`, plain
objects, kept when the two colours and the background's are at least {COLOUR_GAP:g} apart in RGB), one
image each. Placement is read from colour (the evaluator scores whole single-object scenes): right when
each object's colour ({NEAR:g} RGB) is in its own half, at least {MIN_PIXELS} pixels and twice as many
as in the other half. Renders of the same scenes are read right {two['placed_renders']}/{two['n']}.

| generated | both objects placed right | both colours drawn |
|---|---|---|
| {two['n']} | {placed} | {drawn} |

The first {min(GRID_PROMPTS // 2, two['n'])} prompts x {GRID_SEEDS} seeds (column 1 is the image that was read):

![two objects](images/base_two_objects.png)

{pair_captions}
"""


def write_markdown(path: Path, r: dict) -> None:
    a, m = r["args"], r["machine"]
    captions = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(r["grid_captions"]))
    chance = ", ".join(f"{k} {pct(v['chance'])}" for k, v in r["generated"].items() if k != "all three")
    sweep = ""
    if r.get("sweep"):
        sweep = (f"\n## Guidance sweep\n\nGenerated accuracy on the same {a['prompts']} prompts and seeds, "
                 f"{a['steps']} steps:\n\n{sweep_table(r['sweep'])}\n")
    text = f"""# Base model quality (Foundation benchmark)

Does the base model draw what the prompt says? {a['prompts']} held-out prompts (random base scenes
from `random.Random({HELD_OUT_SEED})`, style "none", pattern "plain"; pretraining draws from seeds 0 and 1)
are generated once each ({a['steps']} DDIM steps, guidance {a['guidance']:g}, {r['resolution']}x{r['resolution']},
one seeded generator per image) and read zero-shot by the evaluator: for each attribute the candidates are
the prompt's caption with that attribute swapped for every value of its vocabulary, and a reading is
correct when the evaluator's argmax is the prompt's value. "Renders accuracy" is the same reading on
real renders of the same scenes: the evaluator's own accuracy, an upper bound on what generated
images can score. "VAE round-trip accuracy" reads the same renders after encoding and decoding
them with the pipeline's VAE: what the latent space can hold, an upper bound for the UNet. Chance: {chance}. The scenes are new (pose, jitter
and render noise), but with a finite vocabulary their captions can also occur in pretraining: this measures
prompt following within the base vocabulary, not generalisation to new words.

Pipeline: `{a['pipeline']}`; evaluator: `{a['evaluator']}`.

{results_table(r['generated'], r['vae_round_trip'], r['renders'])}

Where the misses come from:

{error_budget(r['generated'], r['vae_round_trip'], r['renders'])}
{sweep}{two_objects_section(r.get('two_objects'))}
{timing_line(r)}

## Samples

Generated, {GRID_PROMPTS} prompts (rows) x {GRID_SEEDS} seeds (columns), upscaled x{GRID_SCALE} (nearest neighbour);
column 1 is the image that was read for the table:

![generated samples](images/base_samples.png)

Renders of the same prompts (column 1 is the held-out scene itself, columns 2-4 re-pose it:
rotation and jitter are not in the caption):

![renders](images/base_renders.png)

Prompts, by row:

{captions}

## Reproduce

```
{r['command']}
```

Run on {r['date']} on `{m['platform']}` ({m['processor']}), nproc = {m['nproc']}, Python {m['python']},
torch {m['torch']}, diffusers {m['diffusers']}. Per-prompt readings are in `base_model.json`.
"""
    path.write_text(text)


def read_two_objects(pipe, args, out: Path) -> dict:
    """Placement readings of ``args.two_objects`` held-out two-object prompts (one image each) and of their
    renders, and the grid ``images/base_two_objects.png`` (the first 4 prompts x 4 seeds)."""
    pairs = readable_pairs(args.two_objects, seed=HELD_OUT_SEED + 1)
    captions = [caption(s) for s in pairs]

    def draw(indices_seeds):
        return generate(pipe, [captions[i] for i, _ in indices_seeds],
                        [image_seed(args.seed, i, j) for i, j in indices_seeds], steps=args.steps,
                        guidance=args.guidance)

    images = draw([(i, 0) for i in range(len(pairs))])
    readings = [read_placement(img, s) for img, s in zip(images, pairs)]
    renders = [read_placement(np.asarray(render(s, i)), s) for i, s in enumerate(pairs)]
    rows = min(GRID_PROMPTS // 2, len(pairs))
    more = draw([(i, j) for i in range(rows) for j in range(1, GRID_SEEDS)])
    grid([[images[i], *more[i * (GRID_SEEDS - 1):(i + 1) * (GRID_SEEDS - 1)]] for i in range(rows)]).save(
        out / "images" / "base_two_objects.png")
    result = {"n": len(pairs), "placed": sum(r["placed"] for r in readings),
              "both_drawn": sum(r["objects_drawn"] == 2 for r in readings),
              "placed_renders": sum(r["placed"] for r in renders),
              "per_prompt": [{"caption": c, **r} for c, r in zip(captions, readings)]}
    print(f"two objects: placed {result['placed']}/{len(pairs)}, both drawn {result['both_drawn']}, "
          f"renders placed {result['placed_renders']}", flush=True)
    return result


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=EMBEDDED, help="diffusers pipeline directory, or 'embedded' (default)")
    parser.add_argument("--evaluator", default=EMBEDDED, help="evaluator directory, or 'embedded' (default)")
    parser.add_argument("--prompts", type=int, default=200, help="number of held-out prompts (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--sweep", type=float, nargs="*", default=None, metavar="G",
                        help="also read generated accuracy at these guidance scales (e.g. --sweep 1 3 5 7.5 10)")
    parser.add_argument("--two-objects", type=int, default=100,
                        help="two-object prompts whose placement is read (default 100; 0 skips)")
    parser.add_argument("--timing-runs", type=int, default=5, help="timed batches of 16 after one warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/", help="directory for BASE_MODEL.md, base_model.json, images/")
    return parser.parse_args(argv)


def read_single_objects(pipe, evaluator, args, samples: list[tuple[Scene, int]], seeds: list[int]) -> dict:
    """Readings of real renders (the evaluator's own accuracy), of their VAE round trip and of generated images
    (at ``--guidance`` and at each ``--sweep`` scale) of the held-out scenes."""
    scenes = [s for s, _ in samples]
    prompts = [caption(s) for s in scenes]
    renders = render_batch(samples)
    ren_readings = read_attributes(evaluator, renders, scenes)
    vae_acc = accuracies(read_attributes(evaluator, vae_round_trip(pipe, renders, args.device), scenes), scenes)

    def read_generated(guidance: float):
        images = generate(pipe, prompts, seeds, steps=args.steps, guidance=guidance)
        readings = read_attributes(evaluator, images, scenes)
        return readings, accuracies(readings, scenes)

    gen_readings, gen_acc = read_generated(args.guidance)
    sweep = []
    for g in args.sweep or []:
        acc = gen_acc if g == args.guidance else read_generated(g)[1]
        sweep.append({"guidance": g, "accuracy": acc})
        print(f"guidance {g:g}: " + ", ".join(f"{k} {pct(v['accuracy'])}" for k, v in acc.items()), flush=True)
    return {"generated": gen_acc, "renders": accuracies(ren_readings, scenes), "vae_round_trip": vae_acc,
            "sweep": sweep, "gen_readings": gen_readings, "ren_readings": ren_readings}


def save_grids(pipe, args, samples: list[tuple[Scene, int]], out: Path) -> list[str]:
    """``images/base_samples.png`` (the first 8 prompts x 4 seeds) and ``images/base_renders.png`` (renders of the
    same scenes, re-posed); returns the grid's captions."""
    k = min(GRID_PROMPTS, len(samples))
    captions = [caption(s) for s, _ in samples[:k]]
    grid_prompts = [p for p in captions for _ in range(GRID_SEEDS)]
    grid_seeds = [image_seed(args.seed, i, j) for i in range(k) for j in range(GRID_SEEDS)]
    grid_images = generate(pipe, grid_prompts, grid_seeds, steps=args.steps, guidance=args.guidance)
    grid([list(grid_images[i * GRID_SEEDS:(i + 1) * GRID_SEEDS]) for i in range(k)]).save(out / "images" / "base_samples.png")
    grid([[np.asarray(render(v, seed)) for v in pose_variants(scene, GRID_SEEDS, seed)]
          for scene, seed in samples[:k]]).save(out / "images" / "base_renders.png")
    return captions


def print_summary(result: dict, out: Path) -> None:
    gen_acc, vae_acc, ren_acc, timing = result["generated"], result["vae_round_trip"], result["renders"], result["timing"]
    print()
    print(results_table(gen_acc, vae_acc, ren_acc))
    print()
    print(error_budget(gen_acc, vae_acc, ren_acc))
    if result["sweep"]:
        print()
        print(sweep_table(result["sweep"]))
    median = f"{timing['median_s']:.2f} s" if timing["runs_s"] else "not measured"
    print(f"\nbatch of {BATCH} at {timing['steps']} steps: median {median} "
          f"({len(timing['runs_s'])} runs), torch threads {timing['torch_num_threads']}")
    print(f"wrote {out / 'BASE_MODEL.md'}, {out / 'base_model.json'}, {out / 'images'}/base_*.png "
          f"({result['wall_s']:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for lib in ("diffusers", "transformers"):  # quiet loading bars and warnings; results go to stdout
        logging = __import__(f"{lib}.utils", fromlist=["logging"]).logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    pipe = load_pipeline(args.pipeline, device=args.device)
    evaluator = load_evaluator(EMBEDDED_EVALUATOR if args.evaluator == EMBEDDED else args.evaluator).to(args.device)
    samples = held_out_scenes(args.prompts)
    prompts = [caption(s) for s, _ in samples]
    seeds = [image_seed(args.seed, i) for i in range(len(prompts))]
    readings = read_single_objects(pipe, evaluator, args, samples, seeds)
    print(f"generated and read {len(prompts)} prompts ({time.time() - t_start:.0f}s)", flush=True)
    grid_captions = save_grids(pipe, args, samples, out)
    two_objects = read_two_objects(pipe, args, out) if args.two_objects > 0 else None
    times = time_batch(pipe, prompts[:BATCH], steps=args.steps, guidance=args.guidance, device=args.device,
                       runs=args.timing_runs) if args.timing_runs > 0 else []

    gen_readings, ren_readings = readings.pop("gen_readings"), readings.pop("ren_readings")
    result = {
        "args": {**vars(args), "pipeline": str(args.pipeline), "evaluator": str(args.evaluator)},
        "command": shlex.join(["python", "scripts/bench_base_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "resolution": resolution(pipe),
        "held_out_seed": HELD_OUT_SEED,
        "target": TARGET,
        **{k: readings[k] for k in ("generated", "renders", "vae_round_trip", "sweep")},
        "two_objects": two_objects,
        "timing": {"batch": BATCH, "steps": args.steps, "runs_s": times,
                   "median_s": statistics.median(times) if times else None,
                   "torch_num_threads": torch.get_num_threads()},
        "grid_captions": grid_captions,
        "per_prompt": [
            {"caption": p, "seed": sd, "render_seed": rs, **{a: getattr(s, a) for a in ATTRIBUTES},
             "generated_reading": {a: gen_readings[a][i] for a in ATTRIBUTES},
             "render_reading": {a: ren_readings[a][i] for a in ATTRIBUTES}}
            for i, (p, sd, (s, rs)) in enumerate(zip(prompts, seeds, samples))
        ],
        "wall_s": round(time.time() - t_start, 1),
    }
    (out / "base_model.json").write_text(json.dumps(result, indent=2))
    write_markdown(out / "BASE_MODEL.md", result)
    print_summary(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
