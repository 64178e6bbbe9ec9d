"""The studio's page (Gradio Blocks) and its server: four tabs over ``core.Studio``.

Learn streams its job's status into the page (a progress bar, the loss and the time left; "waiting for the other
learner" while another writer holds the museum's lock); Museum lists, removes and exports concepts; Generate draws
with the concepts' phrases and the generation options of their methods (``Method.generation_options``, read from the
methods, not listed here); Benchmark shows a ``museum bench`` folder's report."""

from __future__ import annotations

import html
import ipaddress
import warnings
from pathlib import Path

from museum.errors import MuseumUserError
from museum.export import FORMATS
from museum.methods.base import METHODS, method_names
from museum.museum import Concept, Museum
from museum.report.html import Raw, img_tag, table
from museum.store.manifest import MANIFEST
from museum.studio.core import (
    CONCEPT_HEADERS, MAX_IMAGES, MIN_IMAGES, LearnRequest, LearnStatus, Studio, bench_report, concept_row,
    knob_options, knobs, sample_image,
)
from museum.training.data import MAX_FILE_BYTES

try:
    import gradio as gr
except ImportError:
    raise MuseumUserError('the studio needs Gradio: pip install -e ".[studio]" (or pip install gradio)') from None

DEFAULT_METHOD = "c-lora"
CSS = """
#learn-sample img, #museum-table img, #gen-gallery img { image-rendering: pixelated; }
#museum-table table { border-collapse: collapse; } #museum-table td, #museum-table th { border: 1px solid #ddd;
  padding: 4px 8px; text-align: left; }
#learn-status progress { width: 100%; height: 1.2em; accent-color: #f97316; }
.studio-note { font-size: 0.85em; color: #666; }
.studio-error { color: #b00020; font-weight: 600; }
"""


# ------------------------------------------------------------------------------------------- what the page shows
def message_html(text: str, error: bool = False) -> str:
    return f'<div class="{"studio-error" if error else "studio-message"}">{html.escape(text)}</div>' if text else ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def status_html(s: LearnStatus) -> str:
    """A learning job's status: a progress bar (indeterminate while it waits or prepares), the loss, the time left."""
    if s.state in ("waiting", "preparing", "cancelling"):
        bar = "<progress></progress>"
    elif s.state in ("training", "done"):
        bar = f'<progress value="{s.step}" max="{s.total}"></progress>'
    else:
        bar = ""
    parts = [s.message]
    if s.state == "training" and s.loss is not None:
        parts.append(f"loss {s.loss:.4f}")
    if s.state == "training":
        parts.append(f"about {_duration(s.seconds_left)} left" if s.seconds_left is not None else "timing the steps")
    notes = "".join(f'<div class="studio-note">{html.escape(n)}</div>' for n in s.notes if s.state != "done")
    css = "studio-error" if s.state == "failed" else "studio-message"
    return (f'<div data-state="{s.state}" data-concept="{html.escape(s.name)}" data-step="{s.step}">{bar}'
            f'<div class="{css}">'
            f'{html.escape(" · ".join(parts))}</div>{notes}</div>')


def museum_html(concepts: list[Concept]) -> str:
    """Every concept with its sample grid, method, size and learning time, in one table."""
    if not concepts:
        return message_html("no concepts yet: learn one in the Learn tab")
    rows = []
    for c in concepts:
        image = sample_image(c)
        rows.append([Raw(img_tag(image, alt=f"samples of {c.name}")) if image else "", *concept_row(c)])
    return table(["samples", *CONCEPT_HEADERS], rows, table_id="concepts")


def method_about(studio: Studio, method: str) -> str:
    """A method's one-line description and its settings on this museum's base model."""
    settings = ", ".join(f"{k}={v}" for k, v in studio.method_defaults(method).items() if v not in (None, ""))
    return f"**{method}**: {METHODS[method].summary()}\n\n<small>defaults here: {settings}</small>"


def bench_html(folder: str) -> tuple[str, str]:
    """(the report in a frame, a message): the page's styles stay apart from the report's."""
    try:
        page = bench_report(folder)
    except MuseumUserError as err:
        return "", message_html(str(err), error=True)
    frame = (f'<iframe id="bench-frame" srcdoc="{html.escape(page, quote=True)}" '
             'style="width:100%;height:80vh;border:1px solid #ddd"></iframe>')
    return frame, message_html(f"report of {folder.strip()}")


# ------------------------------------------------------------------------------------------- the page
def build(studio: Studio, bench: str | Path | None = None) -> "gr.Blocks":
    """The studio's page on ``studio`` (``bench``: a benchmark folder the Benchmark tab opens with)."""
    methods = method_names()
    first = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    # uploads and drawings Gradio keeps in its cache: every hour, those older than a day are deleted
    with gr.Blocks(title=f"Museum studio: {studio.folder.name}", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as page:
        gr.Markdown(f"## Museum studio · `{studio.folder}`")
        catalog = gr.State([])
        with gr.Tabs():
            with gr.Tab("Learn", id="learn"):
                learn_outputs = _learn_tab(studio, methods, first)
            with gr.Tab("Museum", id="museum"):
                table, remove_btn, chosen, museum_status = _museum_tab(studio)
            with gr.Tab("Generate", id="generate"):
                _generate_tab(studio, catalog)
            with gr.Tab("Benchmark", id="benchmark"):
                _benchmark_tab(bench)

        def refresh():
            concepts = studio.concepts()
            names = [c.name for c in concepts]
            return (studio.catalog(), museum_html(concepts),
                    gr.update(choices=names, value=names[-1] if names else None))

        lists = [catalog, table, chosen]
        page.load(refresh, outputs=lists)
        learn_outputs.then(refresh, outputs=lists)

        def remove(name):
            try:
                return message_html(studio.remove(name))
            except MuseumUserError as err:
                return message_html(str(err), error=True)

        remove_btn.click(remove, chosen, museum_status).then(refresh, outputs=lists)
    return page


def _learn_tab(studio: Studio, methods: list[str], first: str):
    with gr.Row():
        with gr.Column():
            files = gr.File(label=f"{MIN_IMAGES}-{MAX_IMAGES} images of the concept (png, jpg, webp)",
                            file_count="multiple", elem_id="learn-files")
            folder = gr.File(label="or a folder of them", file_count="directory", elem_id="learn-folder")
        with gr.Column():
            name = gr.Textbox(label="name (in prompts: <name>)", placeholder="e.g. sunburst", elem_id="learn-name")
            kind = gr.Radio(["object", "style"], value="object", label="what it is", elem_id="learn-kind")
            class_word = gr.Textbox(label="class word", placeholder="what it is a kind of: circle, dog, mug",
                                    elem_id="learn-class")
            method = gr.Dropdown(methods, value=first, label="method", elem_id="learn-method")
            about = gr.Markdown(method_about(studio, first), elem_id="learn-about")
            steps = gr.Number(studio.method_defaults(first)["steps"], label="steps", precision=0, minimum=1,
                              elem_id="learn-steps")
            with gr.Row():
                go = gr.Button("Learn", variant="primary", elem_id="learn-go")
                cancel = gr.Button("Cancel", variant="stop", elem_id="learn-cancel")
    status = gr.HTML(elem_id="learn-status")
    sample = gr.Image(label="its first samples", type="pil", interactive=False, height=180, elem_id="learn-sample")

    method.change(lambda m: (method_about(studio, m), studio.method_defaults(m)["steps"]), method, [about, steps])
    kind.change(lambda k: gr.update(interactive=k == "object"), kind, class_word)

    def learn(files, folder, name, kind, class_word, method, steps, request: gr.Request):
        style = kind == "style"
        req = LearnRequest((name or "").strip(), [*(files or []), *(folder or [])], method,
                           int(steps or studio.method_defaults(method)["steps"]),
                           class_word=None if style else (class_word or "").strip() or None, style=style)
        try:
            job = studio.learn(request.session_hash, req)
        except MuseumUserError as err:
            yield status_html(LearnStatus("failed", str(err), req.name)), None
            return
        for s in job.statuses():
            yield status_html(s), sample_image(s.concept) if s.concept else None

    def stop(request: gr.Request):
        job = studio.cancel(request.session_hash)
        if job is None:
            return gr.update()
        return status_html(LearnStatus("cancelling", "cancelling after this step", job.request.name))

    # several tabs may learn at once: the museum's writer lock, not Gradio's queue, makes the second one wait
    event = go.click(learn, [files, folder, name, kind, class_word, method, steps], [status, sample],
                     concurrency_limit=None, show_progress="hidden")
    cancel.click(stop, None, status, concurrency_limit=None, show_progress="hidden")
    return event


def _museum_tab(studio: Studio):
    table = gr.HTML(elem_id="museum-table")
    with gr.Row():
        chosen = gr.Dropdown([], label="concept", elem_id="museum-chosen")
        remove = gr.Button("Remove", variant="stop", elem_id="museum-remove")
        export_format = gr.Dropdown([(f"{k}: {v}", k) for k, v in FORMATS.items()], value="diffusers",
                                    label="export format", elem_id="museum-format")
        export = gr.Button("Export (zip)", elem_id="museum-export")
    status = gr.HTML(elem_id="museum-status")
    download = gr.File(label="export", elem_id="museum-download", interactive=False)

    def export_zip(name, format):
        try:
            return str(studio.export_zip(name, format)), message_html(
                f"exported {name} ({format}): unzip it; museum_export.json (and README.txt for AUTOMATIC1111/ComfyUI "
                "files) says how to load it")
        except MuseumUserError as err:
            return None, message_html(str(err), error=True)

    export.click(export_zip, [chosen, export_format], [download, status])
    return table, remove, chosen, status


def _generate_tab(studio: Studio, catalog: "gr.State") -> None:
    prompt = gr.Textbox(label="prompt", placeholder="a <name> circle on a sand background", elem_id="gen-prompt",
                        interactive=True)

    @gr.render(inputs=catalog)
    def concept_controls(concepts):
        """A button inserting each concept's phrase, and the generation options of the concepts' methods."""
        with gr.Row():
            for c in concepts:
                gr.Button(c["phrase"], size="sm", scale=0, elem_classes="phrase").click(
                    lambda p, phrase=c["phrase"]: f"{p.rstrip()} {phrase}".lstrip(), prompt, prompt)
        chosen = knobs(concepts)
        with gr.Row():
            fields = [gr.Textbox(label=k.label, info=None if k.concept else k.option.help, placeholder="default",
                                 interactive=True, elem_classes="knob") for k in chosen]

        def generate(prompt, seed, n, steps, guidance, *values):
            try:
                images = studio.generate(prompt, n=int(n), seed=int(seed), steps=int(steps), guidance=float(guidance),
                                         options=knob_options(chosen, values))
            except MuseumUserError as err:
                return gr.update(), message_html(str(err), error=True)
            return images, message_html(f"{len(images)} image(s) of {prompt!r}")

        go.click(generate, [prompt, seed, n, steps, guidance, *fields], [gallery, status])

    with gr.Row():
        seed = gr.Number(0, label="seed (image k: seed + k)", precision=0, elem_id="gen-seed", interactive=True)
        n = gr.Number(4, label="images", precision=0, minimum=1, maximum=16, elem_id="gen-n", interactive=True)
        steps = gr.Number(25, label="denoising steps", precision=0, minimum=1, elem_id="gen-steps", interactive=True)
        guidance = gr.Number(7.5, label="guidance", minimum=0, elem_id="gen-guidance", interactive=True)
    go = gr.Button("Generate", variant="primary", elem_id="gen-go")
    status = gr.HTML(elem_id="gen-status")
    gallery = gr.Gallery(label="images", columns=4, fit_columns=False, format="png", elem_id="gen-gallery",
                         height="auto")


def _benchmark_tab(bench: str | Path | None) -> None:
    folder = gr.Textbox(str(bench or ""), label="a `museum bench` output folder", elem_id="bench-folder",
                        placeholder="museum-bench")
    go = gr.Button("Open report", elem_id="bench-open")
    status = gr.HTML(elem_id="bench-status")
    report = gr.HTML(elem_id="bench-report")
    go.click(bench_html, folder, [report, status])


# ------------------------------------------------------------------------------------------- serving
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def start(studio: Studio, *, host: str = "127.0.0.1", port: int | None = None, bench: str | Path | None = None,
          block: bool = True) -> "gr.Blocks":
    """Serve the studio's page at ``host:port`` (``port`` None: Gradio's first free one from 7860); ``block``: until
    Ctrl-C, else return the running page (``.close()`` it)."""
    page = build(studio, bench)
    page.queue(default_concurrency_limit=1)  # one drawing at a time; learning waits on the writer lock instead
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, css=CSS,
                max_file_size=MAX_FILE_BYTES, quiet=not block, footer_links=[])
    return page


def serve(folder: str | Path, *, host: str = "127.0.0.1", port: int | None = None, base: str = "embedded",
          bench: str | Path | None = None) -> None:
    """``museum serve``: the studio on the museum ``folder`` (a new one on ``base`` when the folder does not exist or
    is empty), until Ctrl-C."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        Museum.init(folder, base=base)
        print(f"created museum {folder} on base model {base}")
    if not is_loopback(host):
        warnings.warn(f"--host {host}: the studio is reachable from other machines, and it has no login: anyone who "
                      "reaches it can learn, remove and export concepts and open benchmark folders on this machine. "
                      "Use the default 127.0.0.1 unless you mean that")
    studio = Studio(folder)
    try:
        start(studio, host=host, port=port, bench=bench)
    finally:
        studio.close()
