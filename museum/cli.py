"""The ``museum`` command line (typer). Every user error prints one ``error: ...`` line and exits 2.

Each command imports what it uses inside its function: torch and diffusers take seconds to import, and a usage
error or ``--help`` should answer at once."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from typer.exceptions import TyperException

from museum.errors import MuseumUserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Museum: teach a text-to-image model concept after concept, and forget none.")

EXIT_USAGE = 2
ALLOW_PICKLE_HELP = "load a base model whose weights are only in pickle files (.bin/.ckpt; they can run code)"


class UsageError(Exception):
    """A problem with what the user asked for; shown as one line, exit code 2."""


def fail(message: str) -> None:
    raise UsageError(message)


def _check_writable(out: Path) -> None:
    if out.is_dir():
        fail(f"cannot write {out}: it is a folder; pass a file name such as {out / 'samples.png'}")
    parent = out.expanduser().resolve().parent
    if not parent.is_dir():
        fail(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        fail(f"cannot write {out}: permission denied; choose another --out")


def _check_sampling(prompt: str, n: int, steps: int, guidance: float) -> None:
    if not prompt or not prompt.strip():
        fail("the prompt is empty; describe the image, e.g. \"a red star on a sand background\"")
    if n < 1:
        fail(f"--n must be at least 1 (got {n})")
    if steps < 1:
        fail(f"--steps must be at least 1 (got {steps})")
    if guidance < 0:
        fail(f"--guidance must be >= 0 (got {guidance})")


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _by_name(flag: str, items: List[str]) -> dict[str, float] | None:
    """Repeated ``NAME=NUMBER`` values of ``flag`` as {name: number} (None when none is given)."""
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            fail(f"{flag} takes NAME=NUMBER, e.g. {flag} sunburst=0.8 (got {item!r})")
    return values or None


@app.command()
def generate(
    args: List[str] = typer.Argument(..., metavar="[DIR] PROMPT", help="a museum folder (optional) and the prompt"),
    n: int = typer.Option(4, "--n", help="images to draw"),
    seed: int = typer.Option(0, help="seed of the first image; image k uses seed+k"),
    steps: int = typer.Option(25, help="denoising steps"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale"),
    out: Path = typer.Option(Path("museum-samples.png"), help="where to write the image grid (PNG)"),
    base: str = typer.Option("embedded", help="base model without a museum: 'embedded', "
                               "'embedded-two-objects' or a pipeline folder"),
    gate_bias: Optional[float] = typer.Option(None, help="Perfusion gate bias beta (default: each concept's, 0.7)"),
    gate_temp: Optional[float] = typer.Option(None, help="Perfusion gate temperature tau (default: each "
                                              "concept's, 0.05; 0.15 on Stable Diffusion)"),
    strength: List[str] = typer.Option([], help="Perfusion per-concept strength, NAME=X (repeatable)"),
    context_scale: Optional[float] = typer.Option(None, help="ICGen context scale of lfs concepts that keep image "
                                                  "context (default 1; 0 draws without the context)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Draw images of PROMPT (with a museum's concepts when DIR is given) into one grid."""
    if len(args) > 2:
        fail("too many arguments: quote the prompt, e.g. museum generate DIR \"a <name> on a sand background\"")
    folder, prompt = (None, args[0]) if len(args) == 1 else (Path(args[0]), args[1])
    _check_sampling(prompt, n, steps, guidance)
    _check_writable(out)
    _quiet()
    from museum.generation.sampling import generate_images, image_grid, warn_if_truncated

    # the methods' generation options (``Method.generation_options``), passed on by name
    options = {"gate_bias": gate_bias, "gate_temp": gate_temp, "strength": _by_name("--strength", strength),
               "context_scale": context_scale}
    given = [name for name, value in options.items() if value is not None]
    if folder is not None:
        from museum.museum import Museum

        images = Museum.open(folder, allow_pickle=allow_pickle).generate(prompt, n=n, seed=seed, steps=steps,
                                                                         guidance=guidance, options=options)
    else:
        if given:
            fail(f"--{given[0].replace('_', '-')} applies to a museum's concepts; give the museum DIR")
        from museum.models.loading import load_pipeline, resolve_base
        from museum.store.manifest import check_pipeline_files

        check_pipeline_files(resolve_base(base), allow_pickle=allow_pickle)
        pipe = load_pipeline(base)
        warn_if_truncated(pipe.tokenizer, [prompt])
        images = generate_images(pipe, [prompt] * n, seeds=[seed + k for k in range(n)], steps=steps,
                                 guidance=guidance)
    image_grid(images, cols=min(n, 8)).save(out)
    typer.echo(f"wrote {n} image(s) of {prompt!r} to {out}")


@app.command()
def init(folder: Path = typer.Argument(..., metavar="DIR"),
         base: str = typer.Option("embedded", help="'embedded', 'embedded-two-objects' (for "
                                  "two objects side by side), a diffusers pipeline folder, a single-file checkpoint "
                                  "(.safetensors; .ckpt with --allow-pickle) or a hub id (cache, or online)"),
         config: Optional[Path] = typer.Option(None, help="for a single-file --base: a diffusers pipeline folder of "
                                               "the same architecture (configs + tokenizer; nothing is downloaded)"),
         allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP)) -> None:
    """Create an empty museum on a base model."""
    _quiet()
    from museum.museum import Museum

    m = Museum.init(folder, base=base, allow_pickle=allow_pickle, config=config)
    typer.echo(f"created museum {folder} on base model {m.manifest.base_path} ({m.manifest.base_hash})")


@app.command()
def learn(
    folder: Path = typer.Argument(..., metavar="DIR"),
    name: str = typer.Argument(..., help="concept name; its token is <name>"),
    images: Path = typer.Option(..., help="folder of 3-10 images of the concept (png, jpg, webp)"),
    method: str = typer.Option("c-lora", help="see `museum methods`"),
    class_word: Optional[str] = typer.Option(None, help="what the concept is, e.g. circle, dog"),
    style: bool = typer.Option(False, "--style", help="the concept is a style"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the method's)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of this concept"),
    wait: bool = typer.Option(False, "--wait", help="wait for another writer instead of failing"),
    seed: Optional[int] = typer.Option(None),
    checkpoint_every: Optional[int] = typer.Option(None, help="save a checkpoint every N steps (for --resume)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    mixed_precision: Optional[str] = typer.Option(None, help="no | fp16 | bf16: autocast, every weight stays fp32 "
                                                  "(default: no, or what `accelerate launch` set); fp16 needs a GPU"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="recompute UNet activations in backward: less memory, slower"),
    use_8bit_adam: bool = typer.Option(False, "--use-8bit-adam", help="bitsandbytes' AdamW8bit (CUDA GPU only)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu)"),
    set_: List[str] = typer.Option([], "--set", help="override a method setting, KEY=VALUE (repeatable), e.g. "
                                   "--set lr=1e-4 --set batch_size=2; see `museum methods`"),
    ip_adapter: Optional[Path] = typer.Option(None, "--ip-adapter", metavar="DIR", help="lfs on a Stable Diffusion "
                                              "model: a local IP-Adapter folder (its .safetensors weights and "
                                              "image_encoder/, as diffusers' load_ip_adapter reads them); the concept "
                                              "keeps its images' image-encoder embeddings and is drawn with them as "
                                              "context. Nothing is downloaded"),
    ip_adapter_weight: Optional[str] = typer.Option(None, "--ip-adapter-weight", metavar="NAME",
                                                    help="the weight file in the --ip-adapter folder (default: its "
                                                    "only .safetensors file)"),
) -> None:
    """Learn a new concept and add it to the museum (prints a memory estimate first)."""
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1 (got {steps})")
    if checkpoint_every is not None and checkpoint_every < 1:
        fail(f"--checkpoint-every must be at least 1 (got {checkpoint_every})")
    if mixed_precision is not None and mixed_precision not in ("no", "fp16", "bf16"):
        fail(f"--mixed-precision must be no, fp16 or bf16 (got {mixed_precision!r})")
    from museum.methods.base import methods_with_setting, parse_setting

    overrides = {}
    for item in set_:
        try:
            key, value = parse_setting(item)
        except ValueError as error:
            fail(str(error))
        overrides[key] = value
    if (ip_adapter is not None or ip_adapter_weight is not None) and method not in methods_with_setting("ip_adapter"):
        fail(f"--ip-adapter and --ip-adapter-weight are for --method {' or '.join(methods_with_setting('ip_adapter'))} "
             f"(its image context), not {method}")
    for key, value in (("ip_adapter", ip_adapter), ("ip_adapter_weight", ip_adapter_weight)):
        if value is not None:
            if key in overrides:
                fail(f"{key} is given twice (--{key.replace('_', '-')} and --set {key}=...); pass it once")
            overrides[key] = str(value)
    _quiet()
    from museum.museum import Museum
    from museum.training.trainer import TrainOptions

    options = TrainOptions(mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                           use_8bit_adam=use_8bit_adam)
    m = Museum.open(folder, allow_pickle=allow_pickle)
    try:
        c = m.learn(name, images, method=method, class_word=class_word, style=style, steps=steps, resume=resume,
                    wait=wait, seed=seed, checkpoint_every=checkpoint_every, options=options, device=device,
                    echo=lambda line: typer.echo(line, err=True), **overrides)
    except ValueError as err:  # an unknown or ill-typed --set
        if not overrides or "setting" not in str(err):
            raise
        fail(str(err))
    if c is None:  # another process of an `accelerate launch` run: the main process commits and reports
        return
    typer.echo(f"learned {c.name} with {c.method} in {c.info['train_seconds']:.0f}s ({c.info['steps']} steps); "
               f"use it as \"{c.phrase}\"; sample: {c.path / 'sample.png'}")


@app.command("list")
def list_concepts(folder: Path = typer.Argument(..., metavar="DIR")) -> None:
    """List the museum's concepts in learning order."""
    from rich.console import Console
    from rich.table import Table

    from museum.museum import Museum
    from museum.store.manifest import Manifest, verify_files

    for attempt in range(5):  # checksums only (cheap): a damaged concept is listed, and named after the table
        m = Museum.open(folder)
        damaged = []
        for c in m.concepts:
            try:
                verify_files(c.path, c.files, f"concept {c.name!r}")
            except MuseumUserError as err:
                damaged.append(err)
        if not damaged or Manifest.read(folder).to_json() == m.manifest.to_json():
            break  # (otherwise a writer committed meanwhile: list the new state)
    table = Table(title=f"{folder} (base {m.manifest.base_path})")
    for col in ("#", "name", "use as", "method", "class", "steps", "seconds", "bytes"):
        table.add_column(col)
    for c in m.concepts:
        table.add_row(str(c.task_index), c.name, c.phrase, c.method, c.class_word, str(c.info.get("steps", "")),
                      f"{c.info.get('train_seconds', 0):.0f}", f"{c.size:,}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    if not m.concepts:
        typer.echo("no concepts yet: `museum learn DIR NAME --images FOLDER --class-word WORD`")
    for err in damaged:
        typer.echo(f"warning: {err}", err=True)


@app.command()
def remove(folder: Path = typer.Argument(..., metavar="DIR"), name: str = typer.Argument(...),
           wait: bool = typer.Option(False, "--wait")) -> None:
    """Forget a concept (refused for methods whose shared state cannot drop one concept)."""
    from museum.museum import Museum

    Museum.open(folder).remove(name, wait=wait)
    typer.echo(f"removed {name} from {folder}")


@app.command()
def export(folder: Path = typer.Argument(..., metavar="DIR"), names: List[str] = typer.Argument(..., metavar="NAME..."),
           out: Path = typer.Option(..., help="output folder"),
           format: str = typer.Option("diffusers", help="diffusers (plain diffusers), kohya (a LoRA + embeddings for "
                                      "AUTOMATIC1111/ComfyUI) or a1111 (embeddings only)"),
           rank: Optional[int] = typer.Option(None, help="cap the LoRA's rank (SVD; the error is printed)"),
           allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP)) -> None:
    """Write concepts in files plain diffusers, AUTOMATIC1111 or ComfyUI load (several names: composed as Museum
    composes them)."""
    _quiet()
    from museum.export import summary
    from museum.museum import Museum

    path = Museum.open(folder, allow_pickle=allow_pickle).export(names, out, format, rank)
    typer.echo("\n".join(summary(path)))


@app.command()
def merge(folder: Path = typer.Argument(..., metavar="DIR"), names: List[str] = typer.Argument(..., metavar="NAME..."),
          out: Path = typer.Option(..., help="output folder"),
          allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP)) -> None:
    """Merge several concepts into one set of weights (Custom Diffusion's closed form for its concepts) and export it."""
    if len(names) < 2:
        fail("merge needs at least two concept names")
    _quiet()
    from museum.museum import Museum

    path = Museum.open(folder, allow_pickle=allow_pickle).export(names, out)
    typer.echo(f"merged {', '.join(names)} into {path}")


@app.command()
def methods() -> None:
    """List the registered methods and their default settings."""
    from museum.methods import METHODS, method_names

    for name in method_names():
        cls = METHODS[name]
        typer.echo(f"{name}: {cls.summary()}")
        typer.echo(f"    defaults: {cls.config_class().to_dict()}")
        if cls.config_class.SD15:
            typer.echo(f"    on SD-1.x/2.x/XL bases: {dict(cls.config_class.SD15)}"
                       + ("" if cls.two_text_encoders else " (not on SDXL yet)"))


@app.command()
def demo(out: Path = typer.Option(Path("museum-demo"), help="folder for the museum and its gallery"),
         method: str = typer.Option("custom-diffusion"), steps: Optional[int] = typer.Option(None)) -> None:
    """Learn three concepts one after another on the embedded model and write a gallery page."""
    _quiet()
    from museum.demo import run_demo

    run_demo(out, method=method, steps=steps)


@app.command()
def pretrain(out: Path = typer.Option(Path("museum/embedded")), work: Path = typer.Option(Path(".cache/pretrain")),
             seed: int = typer.Option(0),
             continue_from: Optional[Path] = typer.Option(None, help="a trained model folder (e.g. museum/embedded) "
                                                          "to continue, VAE decoder only; see scripts/pretrain.py "
                                                          "for the step counts"),
             pair_fraction: float = typer.Option(0.0, help="fraction of two-object scenes (\"a small red circle on "
                                                  "the left and a small blue star on the right ...\") in the "
                                                  "pretraining set; the shipped model: 0")) -> None:
    """Train the embedded model and evaluator from scratch (at most ~90 minutes on 2 CPU cores), or continue one."""
    from museum.models.pretrain import pretrain as run

    if not 0.0 <= pair_fraction <= 1.0:
        raise typer.BadParameter(f"--pair-fraction is a fraction of scenes, 0 to 1; got {pair_fraction}")
    run(out, work, seed=seed, continue_from=continue_from, pair_fraction=pair_fraction)


#: where World v2's pretraining (scripts/pretrain_v2.py) leaves its model until it ships as the embedded one
WORLD_V2_MODEL = Path.home() / ".cache/museum/pretrain-v2"
WORLDS = {"v1": 10, "v2": 32}  # world -> tasks it has


@app.command()
def bench(
    methods: str = typer.Option("all", help="'all' or comma-separated method names (see `museum methods`)"),
    tasks: int = typer.Option(10, help="how many benchmark concepts to learn, in order (v1: up to 10, v2: 32)"),
    quick: bool = typer.Option(True, "--quick/--full", help="quick: 8 prompts x 4 seeds per concept; full: 20 x 8 "
                                                             "(v2: 24 x 8)"),
    out: Path = typer.Option(Path("museum-bench"), help="output folder (a rerun continues what is there)"),
    steps: Optional[int] = typer.Option(None, help="training steps per concept (default: each method's)"),
    upper_bound: Optional[bool] = typer.Option(None, "--upper-bound/--no-upper-bound",
                                               help="also learn each concept alone from the base model (default: "
                                                    "off on v1, on on v2)"),
    base: Optional[str] = typer.Option(None, help="'embedded', 'embedded-two-objects' or a diffusers pipeline "
                                                  "folder (default: v1 'embedded'; v2 WORLD_V2/pipeline)"),
    world: str = typer.Option("v1", help="v1: the shipped model's world; v2: World v2 (issue #23: seeds, "
                                         "generality, side by side, both fidelity readings)"),
    seeds: Optional[int] = typer.Option(None, help="v2: training seeds per method and upper bound (default 3)"),
    score_every: int = typer.Option(1, help="v2: read every seen concept after every N tasks and the last"),
    generality_prompts: int = typer.Option(64, help="v2: held-out prompts of the retained-generality reading (an "
                                                    "attribute moves in steps of 100/N points)"),
    joint: bool = typer.Option(True, "--joint/--no-joint", help="v2: also learn every concept at once with each "
                                                                "method that can (finetune, custom-diffusion)"),
    evaluator: Optional[Path] = typer.Option(None, help="an evaluator folder (default: v1 the shipped one; v2 "
                                                        "WORLD_V2/evaluator)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps; under `accelerate launch`, cuda is each "
                                           "process's own GPU"),
) -> None:
    """Run the continual benchmark: every method learns the concepts one after another and is scored after each.

    `accelerate launch --num_processes N -m museum bench ...` spreads the methods (and upper bounds; on v2 each
    training seed) over N processes, each learning whole task sequences alone; the results are the same as one
    process's. WORLD_V2 is ~/.cache/museum/pretrain-v2, where scripts/pretrain_v2.py leaves the model."""
    chosen = _bench_request(methods, tasks, steps, world, seeds, score_every)
    _quiet()
    from museum.evaluation.benchmark import RESULTS
    from museum.models.loading import load_evaluator
    from museum.report.benchmark_report import write_report
    from museum.training.trainer import get_accelerator

    if world == "v1":
        from museum.evaluation.benchmark import run_benchmark
        from museum.world.concepts import BENCHMARK_CONCEPTS

        run_benchmark(chosen, BENCHMARK_CONCEPTS[:tasks], out, quick=quick, base=base or "embedded", steps=steps,
                      upper_bound=bool(upper_bound), device=device,
                      evaluator=load_evaluator(evaluator) if evaluator else None)
    else:
        from museum.evaluation.benchmark.v2 import run_benchmark
        from museum.methods.base import method_names

        base, evaluator = Path(base or WORLD_V2_MODEL / "pipeline"), evaluator or WORLD_V2_MODEL / "evaluator"
        if not (base / "model_index.json").is_file() or not (evaluator / "config.json").is_file():
            fail(f"World v2's model is not at {base} and {evaluator} (scripts/pretrain_v2.py makes it): pass "
                 f"--base PIPELINE and --evaluator FOLDER")
        run_benchmark(method_names() if chosen == "all" else chosen, tasks, out, base=base,
                      evaluator=load_evaluator(evaluator), seeds=seeds or 3, quick=quick, steps=steps,
                      upper_bound=upper_bound is not False, joint=joint, score_every=score_every,
                      generality_prompts=generality_prompts, device=device)
    if not get_accelerator().is_main_process:  # every process has finished; one writes the report
        return
    page = write_report(out)
    typer.echo(f"results: {out / RESULTS}\nreport: {page}\nopen it with: python -m webbrowser -t {page.resolve().as_uri()}")


def _bench_request(methods: str, tasks: int, steps: int | None, world: str, seeds: int | None,
                   score_every: int) -> str | list[str]:
    """``museum bench``'s options checked (a usage error names what to do); the methods asked for."""
    if world not in WORLDS:
        fail(f"--world must be one of {', '.join(WORLDS)} (got {world!r})")
    if not 1 <= tasks <= WORLDS[world]:
        fail(f"--tasks must be between 1 and {WORLDS[world]} (got {tasks})")
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1 (got {steps})")
    if world == "v1" and (seeds not in (None, 1) or score_every != 1):
        fail("--seeds and --score-every need --world v2 (the first world's benchmark is one seed, read after "
             "every task)")
    if (seeds is not None and seeds < 1) or score_every < 1:
        fail(f"--seeds and --score-every must be at least 1 (got {seeds} and {score_every})")
    from museum.methods.base import method_names

    chosen = "all" if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in method_names()] if chosen != "all" else []
    if unknown or not chosen:
        fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(method_names())} or all")
    return chosen


@app.command()
def report(folder: Path = typer.Argument(..., metavar="DIR", help="a `museum bench` output folder")) -> None:
    """Write DIR/report.html from a benchmark's DIR/results.json."""
    from museum.report.benchmark_report import write_report

    page = write_report(folder)
    typer.echo(f"report: {page}\nopen it with: python -m webbrowser -t {page.resolve().as_uri()}")


@app.command()
def serve(folder: Path = typer.Argument(Path("my-museum"), metavar="[DIR]", help="the museum (made on --base when the "
                                        "folder does not exist)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on; any other than this machine's loopback "
                                   "opens the studio (which has no login) to the network"),
          port: Optional[int] = typer.Option(None, help="port (default: the first free one from 7860)"),
          base: str = typer.Option("embedded", help="base model of a new museum, as for `museum init`"),
          bench: Optional[Path] = typer.Option(None, help="a `museum bench` folder for the Benchmark tab")) -> None:
    """Open the web studio on a museum: learn, browse, draw, export, benchmark report (pip install -e ".[studio]")."""
    _quiet()
    from museum.studio.app import serve as run

    run(folder, host=host, port=port, base=base, bench=bench)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


#: system errors a user fixes (a full disk, a read-only folder): one error line, not a traceback
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time chatter before an error line
    warnings.showwarning = _show_warning  # Museum's warnings (e.g. a truncated prompt) as one line each
    try:
        app(standalone_mode=False)
    except (UsageError, MuseumUserError) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        typer.echo(f"error: {err.strerror}{where}; nothing was committed, the museum is as it was "
                   "(free some space or fix the permissions, then run the command again)", err=True)
        sys.exit(EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except TyperException as err:  # typer's own usage errors (missing argument, bad option value)
        typer.echo(f"error: {err.format_message() if hasattr(err, 'format_message') else err}", err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
