"""The continual benchmark on the tiny random pipeline with a tiny random evaluator: the shape of
its results, the report, resuming (after an exception and after a SIGKILL), the gate curve, and
the metrics on cases whose answer is known."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import museum.evaluation.benchmark.run as bench_run
from museum import cli
from museum.evaluation import benchmark as bm
from museum.evaluation.benchmark import BenchmarkError, build_prototypes, kid, run_benchmark, summarize
from museum.evaluation.metrics import backward_transfer, forgetting, image_alignment
from museum.generation.sampling import image_grid
from museum.methods.perfusion import PerfusionConfig
from museum.models.evaluator import Evaluator
from museum.models.tokenizer import write_clip_tokenizer
from museum.museum import Museum
from museum.report.benchmark_report import write_report
from museum.report.figures import grid_cells
from museum.world.concepts import build_concept
from museum.world.render import base_vocabulary, held_out_vocabulary

METHODS = ["textual-inversion", "c-lora"]
CONCEPTS = ["sunburst", "neon", "checker"]  # an object, a style, an object
FAST = dict(lr=2e-2, token_lr=0.5)
# 1 template x 4 seeds per concept, 2 denoising steps, 2 training steps: seconds per task
RUN = dict(steps=2, n_prompts=1, n_seeds=4, gen_steps=2, progress=False,
           method_overrides={m: FAST for m in METHODS})


def make_evaluator(folder):
    """A tiny random evaluator (the same weights every call: a killed run's subprocess builds it too)."""
    tokenizer = write_clip_tokenizer(base_vocabulary() + held_out_vocabulary(), folder)
    torch.manual_seed(0)
    return Evaluator.create(tokenizer).eval().requires_grad_(False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on 2 busy cores one torch thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    return make_evaluator(tmp_path_factory.mktemp("evaluator"))


@pytest.fixture(scope="module")
def bench(tiny_base, evaluator, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    results = run_benchmark(METHODS, CONCEPTS, out, base=tiny_base, evaluator=evaluator, upper_bound=True, **RUN)
    return out, results


def concept_files(museum_dir):
    """mtime of every file in every concept folder of a museum."""
    return {str(p.relative_to(museum_dir)): p.stat().st_mtime_ns
            for p in sorted((museum_dir / "concepts").rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a reduced run


def test_matrices_are_lower_triangular(bench):
    out, results = bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["version"] == bm.RESULTS_VERSION and on_disk["concepts"] == CONCEPTS
    assert list(on_disk["methods"]) == METHODS
    for method, r in on_disk["methods"].items():
        assert r["complete"]
        for metric in bm.METRICS:
            R = r["R"][metric]
            assert len(R) == 3 and all(len(row) == 3 for row in R)
            for t in range(3):
                for j in range(3):
                    if j > t:
                        assert R[t][j] is None, (method, metric, t, j)
                    else:
                        assert isinstance(R[t][j], float) and np.isfinite(R[t][j]), (method, metric, t, j)
        assert all(0.0 <= v <= 1.0 for row in r["R"]["recognition"] for v in row if v is not None)
        for metric in bm.METRICS:  # A, F and BWT from the matrix, F and BWT oriented so that F > 0 is worse
            sign = 1.0 if bm.HIGHER_IS_BETTER[metric] else -1.0
            R = [[None if v is None else sign * v for v in row] for row in r["R"][metric]]
            F = np.mean([max(R[t][j] for t in range(j, 2)) - R[2][j] for j in range(2)])
            BWT = np.mean([R[2][j] - R[j][j] for j in range(2)])
            assert r["summary"][metric] == pytest.approx(
                {"A": np.mean(r["R"][metric][2]), "F": F, "BWT": BWT}, abs=1e-12), (method, metric)
        assert len(r["train_seconds"]) == 3 and r["seconds_per_task"] > 0
        assert r["gate_curve"] is None  # no generation gate in these methods


def test_storage_is_the_concept_files_plus_state(bench):
    out, results = bench
    for method in METHODS:
        museum_dir = out / method / "museum"
        tensors = sum(p.stat().st_size for p in (museum_dir / "concepts").rglob("*.safetensors"))
        state = sum(p.stat().st_size for p in (museum_dir / "state").glob("*.safetensors")) \
            if (museum_dir / "state").is_dir() else 0
        r = results["methods"][method]
        assert sum(r["concept_bytes"]) == tensors > 0
        assert r["bytes_per_concept"] == pytest.approx((tensors + state) / 3)


def test_grid_rows_are_padded_to_whole_rows():
    """A concept with fewer samples than a grid row still fills exactly one row, so row j of a task's
    grid is always concept j (the report cuts the grids into cells by row)."""
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    row = bm.grid_row([red, red])
    assert len(row) == bm.GRID_IMAGES and row[2].getpixel((0, 0)) == (255, 255, 255)
    assert len(bm.grid_row([red] * 9)) == bm.GRID_IMAGES
    grid = image_grid(bm.grid_row([red, red]) + bm.grid_row([blue] * 5), cols=bm.GRID_IMAGES, scale=2)
    assert grid.size == (4 * 16, 2 * 16)
    assert grid.getpixel((0, 16)) == (0, 0, 255)  # concept 2 starts its own row


def test_grid_cells_cut_a_grid_by_rows(tmp_path):
    colors = ["red", "green", "blue", "yellow"]
    rows = [[Image.new("RGB", (8, 8), c)] * 4 for c in colors[:3]]
    image_grid([im for r in rows for im in r], cols=4, scale=2).save(tmp_path / "g.png")
    cells = grid_cells(tmp_path / "g.png", 3)
    assert [c.size for c in cells] == [(32, 32)] * 3  # 4 images of 16 px as 2 x 2
    assert [c.getpixel((20, 20)) for c in cells] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert grid_cells(tmp_path / "g.png", 2) is None  # 3 rows of 16 px are not 2 rows of square images
    assert grid_cells(tmp_path / "missing.png", 1) is None


def test_grids_hold_one_row_per_seen_concept(bench):
    out, results = bench
    for method in METHODS:
        grids = results["methods"][method]["grids"]
        assert grids == [f"{method}/grids/task-{t:02d}.png" for t in range(3)]
        for t, rel in enumerate(grids):
            with Image.open(out / rel) as im:  # 4 images of 32 px, upscaled 2x, per row
                assert im.size == (4 * 64, (t + 1) * 64)


def test_textual_inversion_forgets_nothing(bench):
    """A token-only method leaves earlier concepts' images bit-identical, so with fixed prompts and
    seeds each column of R is constant and F = BWT = 0 exactly (this checks the seeds are fixed)."""
    _, results = bench
    r = results["methods"]["textual-inversion"]
    for metric in ("image_alignment", "kid"):
        R = r["R"][metric]
        for j in range(3):
            assert len({R[t][j] for t in range(j, 3)}) == 1
        assert r["summary"][metric]["F"] == 0.0 and r["summary"][metric]["BWT"] == 0.0


def test_base_and_upper_bound_rows(bench):
    _, results = bench
    assert results["base"]["concepts"] == CONCEPTS
    assert set(results["upper_bound"]) == set(METHODS)
    for u in results["upper_bound"].values():
        assert u["concepts"] == CONCEPTS and u["bytes_per_concept"] > 0
    # the first concept alone is the same run as the first task of the continual run
    for method in METHODS:
        first = results["methods"][method]["R"]["image_alignment"][0][0]
        assert results["upper_bound"][method]["scores"]["sunburst"]["image_alignment"] == pytest.approx(first, abs=1e-6)


def test_report_has_a_row_per_method_base_and_upper_bound(bench):
    out, _ = bench
    page = write_report(out)
    assert page == out / "report.html"
    text = page.read_text()
    table = re.search(r'<table id="results">.*?</table>', text, re.S).group(0)
    rows = re.findall(r"<tr><td>(.*?)</td>", table)
    assert rows == [*METHODS, "base model (no training)",
                    *(f"upper bound: {m} (each concept alone)" for m in METHODS)]
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header[:4] == ["method", "A (CLIP-I)", "F", "BWT"] and "bytes/concept" in header
    for method in METHODS:
        assert f'id="final-{method}"' in text and f"id='method-{method}'" in text
        samples = re.search(rf'<table id="samples-{method}" class="samples">.*?</table>', text, re.S).group(0)
        labels = re.findall(r"<tr><td>([^<]*)</td>", samples)
        assert labels == ["base model (class prompt)", *(f"after task {t + 1} ({c})" for t, c in enumerate(CONCEPTS)),
                          "each concept alone (upper bound)"]
        # lower-triangular: task t shows concepts 0..t; the base and upper-bound rows show all
        per_row = [len(re.findall(r"<img ", row)) for row in re.findall(r"<tr><td>.*?</tr>", samples)]
        assert per_row == [3, 1, 2, 3, 3]
        assert "gate curve" not in text  # no gated method in this run
    # self-contained: every image inline; 1 curves plot + per method the heatmaps and 12 sample cells
    srcs = re.findall(r'<img src="([^"]{0,30})', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == 1 + len(METHODS) * (1 + 12)


def test_report_cli(bench, monkeypatch, capsys):
    out, _ = bench
    (out / "report.html").unlink(missing_ok=True)
    monkeypatch.setattr(sys, "argv", ["museum", "report", str(out)])
    cli.main()
    assert (out / "report.html").is_file()
    assert "webbrowser" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method"),
    (["--tasks", "0"], "--tasks must be between 1 and 10"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bench_cli_rejects_bad_options(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["museum", "bench", "--out", str(tmp_path / "b"), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_report_of_a_folder_without_results(tmp_path):
    with pytest.raises(BenchmarkError, match="no benchmark results"):
        write_report(tmp_path)


# ----------------------------------------------------------------------------- resuming


def test_rerun_relearns_and_rescores_nothing(bench, tiny_base, evaluator):
    out, results = bench
    before = {m: concept_files(out / m / "museum") for m in METHODS}
    progress = {p: p.read_bytes() for p in out.rglob("progress.json")}
    grids = {p: p.stat().st_mtime_ns for p in out.rglob("grids/*.png")}
    assert len(progress) == 1 + 2 * len(METHODS) and grids
    again = run_benchmark(METHODS, CONCEPTS, out, base=tiny_base, evaluator=evaluator, upper_bound=True, **RUN)
    assert {m: concept_files(out / m / "museum") for m in METHODS} == before
    assert {p: p.read_bytes() for p in out.rglob("progress.json")} == progress
    assert {p: p.stat().st_mtime_ns for p in out.rglob("grids/*.png")} == grids
    assert again["methods"] == results["methods"]


def test_rerun_with_other_settings_is_refused(bench, tiny_base, evaluator):
    out, _ = bench
    with pytest.raises(BenchmarkError, match="n_seeds: 4 there, 2 now"):
        run_benchmark(METHODS, CONCEPTS, out, base=tiny_base, evaluator=evaluator, **dict(RUN, n_seeds=2))
    with pytest.raises(BenchmarkError, match="another task sequence"):
        run_benchmark(METHODS, [CONCEPTS[1], CONCEPTS[0]], out, base=tiny_base, evaluator=evaluator, **RUN)


def test_interrupted_run_continues(bench, tiny_base, evaluator, tmp_path, monkeypatch):
    """Interrupted after learning task 2 but before scoring it: the rerun scores the concept it
    finds in the museum (without relearning it), learns the third and ends as an uninterrupted run."""
    out = tmp_path / "out"
    kw = dict(RUN, base=tiny_base, evaluator=evaluator, base_row=False)
    original = bench_run._Run.generate

    def interrupt(self, m, name):
        if name == CONCEPTS[1]:
            raise KeyboardInterrupt
        return original(self, m, name)

    monkeypatch.setattr(bench_run._Run, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(["textual-inversion"], CONCEPTS, out, **kw)
    monkeypatch.setattr(bench_run._Run, "generate", original)
    museum_dir = out / "textual-inversion" / "museum"
    progress = json.loads((out / "textual-inversion" / "progress.json").read_text())
    assert [t["task"] for t in progress["tasks"]] == [0]
    assert len(concept_files(museum_dir)) == 2 * 3  # sunburst and neon learned (3 files each)
    learned = concept_files(museum_dir)

    results = run_benchmark(["textual-inversion"], CONCEPTS, out, **kw)
    after = concept_files(museum_dir)
    assert {k: v for k, v in after.items() if k in learned} == learned  # nothing relearned
    assert len(after) == 3 * 3
    r = results["methods"]["textual-inversion"]
    assert r["complete"]
    assert [t["task"] for t in json.loads((out / "textual-inversion" / "progress.json").read_text())["tasks"]] == [0, 1, 2]
    assert r["train_seconds"][1] is not None  # the concept learned before the interruption keeps its time
    # same settings, same seeds: the same matrices as the uninterrupted run
    for metric in bm.METRICS:
        expected = bench[1]["methods"]["textual-inversion"]["R"][metric]
        for row, exp in zip(r["R"][metric], expected):
            assert row == pytest.approx(exp, abs=1e-6), metric


KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_benchmark as tb
from museum.evaluation.benchmark import run_benchmark
run_benchmark(tb.METHODS, tb.CONCEPTS, Path(sys.argv[2]), base=sys.argv[3], evaluator=tb.make_evaluator(Path(sys.argv[4])),
              base_row=False, **tb.RUN)
"""


def test_killed_run_resumes_with_the_same_results(bench, tiny_base, tmp_path):
    """A run SIGKILLed while the second method learns its second concept (a crash, `kill -9`): the
    rerun keeps every finished task of both methods (no relearning, no rescoring), learns the
    killed concept again, and ends with the matrices of an uninterrupted run."""
    out = tmp_path / "out"
    env = dict(os.environ, MUSEUM_FAULT="train.step:9", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    # train.step hits: textual-inversion's 3 tasks x 2 steps, c-lora's first task's 2 steps, then the 9th
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(Path(__file__).parent), str(out), str(tiny_base),
                           str(tmp_path / "evaluator")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ti, cl = out / "textual-inversion", out / "c-lora"
    assert [t["task"] for t in json.loads((ti / "progress.json").read_text())["tasks"]] == [0, 1, 2]
    assert [t["task"] for t in json.loads((cl / "progress.json").read_text())["tasks"]] == [0]

    assert [c.name for c in Museum.open(cl / "museum").concepts] == CONCEPTS[:1]  # the second was not committed
    kept = {m: concept_files(out / m / "museum") for m in ("textual-inversion", "c-lora")}
    progress_ti = (ti / "progress.json").read_bytes()
    first_scores = json.loads((cl / "progress.json").read_text())["tasks"][0]
    grids = {p: p.stat().st_mtime_ns for p in out.rglob("grids/*.png")}
    assert len(grids) == 3 + 1

    evaluator = make_evaluator(tmp_path / "evaluator")  # the same weights as the killed run's
    results = run_benchmark(METHODS, CONCEPTS, out, base=tiny_base, evaluator=evaluator, base_row=False, **RUN)
    assert concept_files(ti / "museum") == kept["textual-inversion"]  # finished method: untouched
    assert (ti / "progress.json").read_bytes() == progress_ti
    after = concept_files(cl / "museum")
    assert {k: after[k] for k in kept["c-lora"]} == kept["c-lora"]  # c-lora's first concept: not relearned
    assert len(after) == 3 * len(kept["c-lora"])
    assert json.loads((cl / "progress.json").read_text())["tasks"][0] == first_scores  # not rescored
    assert all(p.stat().st_mtime_ns == t for p, t in grids.items())
    for method in METHODS:
        r, expected = results["methods"][method], bench[1]["methods"][method]
        assert r["complete"]
        for metric in bm.METRICS:
            for row, exp in zip(r["R"][metric], expected["R"][metric]):
                assert row == pytest.approx(exp, abs=1e-6), (method, metric)
        assert r["concept_bytes"] == expected["concept_bytes"] and r["state_bytes"] == expected["state_bytes"]


SHARED_RUN = """
import sys
from pathlib import Path
# the tests, and this checkout's museum (a script's own folder comes first on sys.path, not the working directory)
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
import os
import test_benchmark as tb
from museum.evaluation.benchmark import run_benchmark
# one tokenizer folder per process: two processes writing and reading the same files race
evaluator = tb.make_evaluator(Path(sys.argv[4]) / os.environ["LOCAL_RANK"])
run_benchmark(tb.METHODS, tb.CONCEPTS, Path(sys.argv[2]), base=sys.argv[3], evaluator=evaluator, upper_bound=True, **tb.RUN)
"""


def test_two_processes_share_the_units_and_match_one(bench, tiny_base, tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo): the processes split the units (base row, each
    method's sequence, each upper bound), each taken once, and the results equal the one-process run's."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    script = tmp_path / "shared_run.py"
    script.write_text(SHARED_RUN)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(launch + [str(script), str(Path(__file__).parent), str(out), str(tiny_base),
                                    str(tmp_path / "evaluator")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    taken = re.findall(r"process (\d)/2 ran (\S+)", proc.stdout + proc.stderr)
    units = ["base", *METHODS, *(f"{m}.upper" for m in METHODS)]
    assert sorted(u for _, u in taken) == sorted(units)  # every unit once
    assert {p for p, _ in taken} == {"1", "2"}  # and both processes worked
    results, expected = json.loads((out / "results.json").read_text()), bench[1]
    for method in METHODS:
        for metric in bm.METRICS:
            for row, exp in zip(results["methods"][method]["R"][metric], expected["methods"][method]["R"][metric]):
                assert row == pytest.approx(exp, abs=1e-6), (method, metric)
        assert results["upper_bound"][method]["mean"] == pytest.approx(expected["upper_bound"][method]["mean"])
    assert results["base"]["mean"] == pytest.approx(expected["base"]["mean"])


# ----------------------------------------------------------------------------- the gate curve


def test_gate_curve_of_a_gated_method(tiny_base, evaluator, tmp_path):
    """Perfusion gets a gate curve after its last task: at its own beta (0.7) the point is the last row
    of R, at other betas the concepts are drawn again; a rerun redoes nothing; the report shows it."""
    out = tmp_path / "out"
    kw = dict(RUN, base=tiny_base, evaluator=evaluator, base_row=False, gate_betas=(0.9, 0.7, 0.3),
              method_overrides={"perfusion": dict(lr=2e-2, token_lr=0.5)})
    results = run_benchmark(["perfusion"], CONCEPTS[:2], out, **kw)
    curve = results["methods"]["perfusion"]["gate_curve"]
    assert [p["beta"] for p in curve["points"]] == [0.3, 0.7, 0.9] and curve["tau"] == [PerfusionConfig.tau]
    R = results["methods"]["perfusion"]["R"]
    own = curve["points"][1]
    assert own["from_final_row"] and not curve["points"][0]["from_final_row"]
    for metric in bm.METRICS:
        assert [own["scores"][c][metric] for c in CONCEPTS[:2]] == R[metric][1]
        assert own["mean"][metric] == pytest.approx(np.mean(R[metric][1]))
    # a wide-open gate (beta 0.3) draws other images than the concepts' own gate
    for p in (curve["points"][0], curve["points"][2]):
        assert set(p["scores"]) == set(CONCEPTS[:2]) and all(v["n_images"] == 4 for v in p["scores"].values())
    assert curve["points"][0]["scores"] != own["scores"]

    progress = (out / "perfusion" / "progress.json").read_bytes()
    again = run_benchmark(["perfusion"], CONCEPTS[:2], out, **kw)
    assert (out / "perfusion" / "progress.json").read_bytes() == progress
    assert again["methods"]["perfusion"]["gate_curve"]["points"] == curve["points"]

    text = write_report(out).read_text()
    assert "id='gate-curve-perfusion'" in text and 'alt="perfusion gate curve"' in text
    table = re.search(r'<table id="gate-perfusion">.*?</table>', text, re.S).group(0)
    assert re.findall(r"<tr><td>(.*?)</td>", table) == ["0.3", "0.7", "0.9"]

    # one more task into the same folder: the curve is measured again, after the new last task
    longer = run_benchmark(["perfusion"], CONCEPTS, out, **dict(kw, gate_betas=(0.7, 0.3)))
    curve3 = longer["methods"]["perfusion"]["gate_curve"]
    assert [p["beta"] for p in curve3["points"]] == [0.3, 0.7]
    assert all(set(p["scores"]) == set(CONCEPTS) for p in curve3["points"])
    assert curve3["points"][1]["scores"] == {c: s for c, s in zip(CONCEPTS, [
        json.loads((out / "perfusion" / "progress.json").read_text())["tasks"][2]["scores"][c] for c in CONCEPTS])}
    assert longer["methods"]["perfusion"]["R"]["image_alignment"][:2] == [row + [None] for row in R["image_alignment"]]
    # and the shorter sequence again: its 2 x 2 results, no curve of a museum that has gone on since
    shorter = run_benchmark(["perfusion"], CONCEPTS[:2], out, **kw)
    r2 = shorter["methods"]["perfusion"]
    assert r2["complete"] and r2["R"] == R and r2["gate_curve"] is None and len(r2["grids"]) == 2


# ----------------------------------------------------------------------------- metrics, known cases


def test_image_alignment_of_identical_sets(evaluator):
    refs = build_concept("sunburst", n_ref=8).reference_images
    assert image_alignment(evaluator, refs[:1], refs[:1]) == pytest.approx(1.0, abs=1e-5)
    assert image_alignment(evaluator, [refs[0]] * 4, [refs[0]] * 3) == pytest.approx(1.0, abs=1e-5)
    # a set of distinct images against itself: mean pairwise cosine = |mean unit embedding|^2 < 1
    e = evaluator.embed_images(refs)
    assert image_alignment(evaluator, refs, refs) == pytest.approx(float(e.mean(0).norm() ** 2), abs=1e-5)
    assert image_alignment(evaluator, refs, refs) < 0.999


def test_kid_of_identical_sets(evaluator):
    refs = build_concept("sunburst", n_ref=16).reference_images
    other = build_concept("checker", n_ref=16).reference_images
    # m copies of one image against themselves: every kernel value is equal, KID is 0
    assert abs(kid(evaluator, [refs[0]] * 8, [refs[0]] * 8)) < 1e-9
    # a set of distinct images against itself: the unbiased estimator's finite-sample value is
    # (2/m) * (mean off-diagonal kernel - mean diagonal kernel), slightly negative, not 0
    f = evaluator.image_features(refs).double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    m = len(refs)
    expected = 2 / m * float((k.sum() - k.diag().sum()) / (m * (m - 1)) - k.diag().mean())
    value = kid(evaluator, refs, refs)
    assert value == pytest.approx(expected, rel=1e-6) and value < 0
    assert kid(evaluator, refs, refs) < kid(evaluator, refs, other)


def test_kid_subset_size_follows_the_smaller_set(evaluator):
    refs = build_concept("sunburst", n_ref=16).reference_images
    assert isinstance(kid(evaluator, refs[:3], refs), float)  # torchmetrics' default subset_size 1000 would fail
    assert kid(evaluator, refs[:3], refs) == kid(evaluator, refs[:3], refs)  # seeded subsets: reproducible
    assert kid(evaluator, refs[:1], refs) is None


def test_shuffled_concepts_lower_recognition(evaluator):
    names = ["sunburst", "checker", "neon", "rainbow", "blueprint", "gem"]
    concepts = {n: build_concept(n, n_ref=8) for n in names}
    protos = build_prototypes(evaluator, {n: c.reference_images for n, c in concepts.items()})
    assert protos.labels[:len(names)] == names and "shape:circle" in protos.labels
    shuffled = dict(zip(names, names[1:] + names[:1]))  # every concept scored as another one
    right = np.mean([protos.accuracy(evaluator, c.reference_images, n) for n, c in concepts.items()])
    wrong = np.mean([protos.accuracy(evaluator, c.reference_images, shuffled[n]) for n, c in concepts.items()])
    assert right > wrong + 0.2
    with pytest.raises(ValueError, match="not among the prototypes"):
        protos.accuracy(evaluator, concepts["gem"].reference_images, "mug")


HAND_R = [[0.8, None, None],
          [0.6, 0.9, None],
          [0.5, 0.7, 0.4]]


def test_forgetting_and_backward_transfer_by_hand():
    R = np.array([[np.nan if v is None else v for v in row] for row in HAND_R])
    # F = mean(max(.8, .6) - .5, .9 - .7) = .25; BWT = mean(.5 - .8, .7 - .9) = -.25
    assert forgetting(R) == pytest.approx(0.25)
    assert backward_transfer(R) == pytest.approx(-0.25)
    s = summarize(HAND_R)
    assert s == pytest.approx({"A": (0.5 + 0.7 + 0.4) / 3, "F": 0.25, "BWT": -0.25})
    # lower is better (KID): forgetting is a rise above the best (lowest) earlier value
    # F = mean(.5 - .6, .7 - .9) = -.15 (it improved); BWT = mean(.8 - .5, .9 - .7) = .25
    assert summarize(HAND_R, higher_is_better=False) == pytest.approx({"A": (0.5 + 0.7 + 0.4) / 3, "F": -0.15, "BWT": 0.25})
    c = bm.curves(HAND_R)
    assert c["average"] == pytest.approx([0.8, 0.75, (0.5 + 0.7 + 0.4) / 3])
    assert c["forgetting"] == pytest.approx([0.0, 0.2, 0.25])
    assert summarize([[0.7]]) == {"A": 0.7, "F": 0.0, "BWT": 0.0}
