"""How far a rank-capped LoRA export of Custom Diffusion concepts is from Museum (``museum export --format kohya
--rank R``), for docs/EXPORTS.md.

    OMP_NUM_THREADS=1 python scripts/measure_export_error.py --out docs/export_error.json

Learns two Custom Diffusion concepts on the embedded model with the method's defaults (sunburst, a circle; neon, a
style) and exports each, and the two together (the closed-form merge, dense too), as kohya files at each rank cap
and uncapped. Per export: the LoRA's rank, the relative Frobenius error of its K/V deltas (max and mean over the
layers, as museum_export.json records it), the LoRA file's size, and how far the images drawn from the files differ
from Museum's: the files loaded into a fresh pipeline with diffusers' ``load_lora_weights`` (which reads kohya keys)
and ``load_textual_inversion`` (each embedding under its file name), 2 evaluation prompts x 4 seeds, 25 DDIM steps,
mean and max absolute pixel difference (0-255). "token only" draws with the embeddings and no LoRA: how much the
LoRA itself changes the images. Prints the markdown table of docs/EXPORTS.md and writes the JSON.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from museum.generation.sampling import generate_images
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.world.concepts import build_concept

RANKS = [1, 2, 4, 8, 16, 32, None]  # None: uncapped (every singular value above 1e-6 of the largest)
SEEDS = [0, 1, 2, 3]


def webui_pipeline(base, out: Path, with_lora: bool = True):
    """A fresh pipeline with an export's kohya LoRA (``with_lora``) and embeddings loaded as a webui reads them."""
    pipe = load_pipeline(base)
    if with_lora:
        lora = next((out / "lora").glob("*.safetensors"))
        pipe.load_lora_weights(lora.parent, weight_name=lora.name)
    for file in sorted((out / "embeddings").glob("*.safetensors")):
        pipe.load_textual_inversion(file, token=file.stem)
    return pipe


def images_of(pipe, prompts: list[str]) -> np.ndarray:
    all_prompts = [p for p in prompts for _ in SEEDS]
    return np.stack([np.asarray(im, dtype=np.int16) for im in
                     generate_images(pipe, all_prompts, seeds=SEEDS * len(prompts), steps=25)])


def measure(m: Museum, names: list[str], prompts: list[str], folder: Path) -> dict:
    """Every rank cap of one export: the recorded errors, the file size and the image difference from Museum."""
    ours = np.stack([np.asarray(im, dtype=np.int16) for im in m.generate(prompts, n=len(SEEDS), steps=25)])
    webui_prompts = prompts
    for name in names:  # each token typed as its embedding's word
        webui_prompts = [p.replace(f"<{name}>", name) for p in webui_prompts]
    rows = []
    for rank in RANKS:
        out = m.export(names, folder / f"{'+'.join(names)}-{rank}", format="kohya", rank=rank)
        lora = json.loads((out / "museum_export.json").read_text())["lora"]
        diff = np.abs(images_of(webui_pipeline(m.manifest.base_path, out), webui_prompts) - ours)
        error = lora["approximation"]["relative_frobenius_error"]
        rows.append({"rank_cap": rank, "rank": lora["approximation"]["rank"], "error_max": error["max"],
                     "error_mean": error["mean"], "lora_bytes": (out / lora["file"]).stat().st_size,
                     "pixel_diff_mean": float(diff.mean()), "pixel_diff_max": int(diff.max())})
        print(names, rows[-1], flush=True)
    token_only = np.abs(images_of(webui_pipeline(m.manifest.base_path, out, with_lora=False), webui_prompts) - ours)
    return {"prompts": prompts, "ranks": rows, "token_only_pixel_diff_mean": float(token_only.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/export_error.json"))
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    concepts = [build_concept(n) for n in ("sunburst", "neon")]
    results = {"machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
               "date": time.strftime("%Y-%m-%d"), "method": "custom-diffusion (defaults)", "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        m = Museum.init(Path(tmp) / "museum")
        for c in concepts:
            m.learn(c.name, c.train_images, method="custom-diffusion", class_word=c.class_word, style=c.is_style)
        prompts = {c.name: c.concept_prompts(f"<{c.name}>", quick=True)[:2] for c in concepts}
        prompts["sunburst+neon"] = [f"{p}, <neon> style" for p in prompts["sunburst"]]
        for key, ps in prompts.items():
            results["exports"][key] = measure(m, key.split("+"), ps, Path(tmp) / "exports")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| export | rank cap | rank | relative error: max / mean | LoRA file | pixel difference: mean / max |")
    print("|---|---|---|---|---|---|")
    for key, r in results["exports"].items():
        for row in r["ranks"]:
            print(f"| {key} | {row['rank_cap'] or 'none'} | {row['rank']} | {row['error_max']:.3f} / "
                  f"{row['error_mean']:.3f} | {row['lora_bytes'] / 1024:.0f} KiB | {row['pixel_diff_mean']:.2f} / "
                  f"{row['pixel_diff_max']} |")
        print(f"| {key} | token only (no LoRA) | - | - | - | {r['token_only_pixel_diff_mean']:.2f} / - |")


if __name__ == "__main__":
    main()
