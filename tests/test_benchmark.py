"""The continual benchmark on the tiny random pipeline with a tiny random evaluator: the shape of
its results, the report, resuming, and the metrics on cases whose answer is known."""

import json
import re
import sys

import numpy as np
import pytest
import torch

from museum.evaluation import benchmark as bm
from museum.evaluation.benchmark import BenchmarkError, build_prototypes, kid, run_benchmark, summarize
from museum.evaluation.metrics import backward_transfer, forgetting, image_alignment
from museum.report.benchmark_report import write_report
from museum.world.concepts import build_concept

METHODS = ["textual-inversion", "c-lora"]
CONCEPTS = ["sunburst", "neon", "checker"]  # an object, a style, an object
FAST = dict(lr=2e-2, token_lr=0.5)
# 1 template x 4 seeds per concept, 2 denoising steps, 2 training steps: seconds per task
RUN = dict(steps=2, n_prompts=1, n_seeds=4, gen_steps=2, progress=False,
           method_overrides={m: FAST for m in METHODS})


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    from museum.base.tokenizer import write_clip_tokenizer
    from museum.evaluation.evaluator import Evaluator
    from museum.world.render import base_vocabulary, held_out_vocabulary

    tokenizer = write_clip_tokenizer(base_vocabulary() + held_out_vocabulary(), tmp_path_factory.mktemp("evaluator"))
    torch.manual_seed(0)
    return Evaluator.create(tokenizer).eval().requires_grad_(False)


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
        assert r["summary"]["image_alignment"]["A"] == pytest.approx(np.mean(r["R"]["image_alignment"][2]))
        assert len(r["train_seconds"]) == 3 and r["seconds_per_task"] > 0


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


def test_grids_hold_one_row_per_seen_concept(bench):
    from PIL import Image

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
    # self-contained: every image inline; 1 curves plot + per method a heatmap and 3 grids + 3 base grids
    srcs = re.findall(r'<img src="([^"]{0,30})', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == 1 + len(METHODS) * (1 + 3) + 3


def test_report_cli(bench, monkeypatch, capsys):
    from museum import cli

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
    from museum import cli

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


def test_interrupted_run_continues(bench, tiny_base, evaluator, tmp_path, monkeypatch):
    """Interrupted after learning task 2 but before scoring it: the rerun scores the concept it
    finds in the museum (without relearning it), learns the third and ends as an uninterrupted run."""
    out = tmp_path / "out"
    kw = dict(RUN, base=tiny_base, evaluator=evaluator, base_row=False)
    original = bm._Run.generate

    def interrupt(self, m, name):
        if name == CONCEPTS[1]:
            raise KeyboardInterrupt
        return original(self, m, name)

    monkeypatch.setattr(bm._Run, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(["textual-inversion"], CONCEPTS, out, **kw)
    monkeypatch.setattr(bm._Run, "generate", original)
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
    # same settings, same seeds: the same matrix as the uninterrupted run
    expected = bench[1]["methods"]["textual-inversion"]["R"]["image_alignment"]
    for row, exp in zip(r["R"]["image_alignment"], expected):
        assert row == pytest.approx(exp, abs=1e-6)


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
