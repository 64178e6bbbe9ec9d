"""The benchmark on World v2 (issue #23) with a tiny random v2 pipeline and a tiny 64x64 evaluator: training
seeds and their intervals, both fidelity readings with their anchors, the upper bound, retained generality,
two concepts side by side, reading every N tasks, resuming, two processes, the report and the command."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

import museum.evaluation.benchmark.v2 as v2_package
import museum.evaluation.benchmark.v2.run as v2_run
from museum import cli
from museum.evaluation.benchmark.units import BenchmarkError
from museum.evaluation.benchmark.v2 import metrics as M
from museum.evaluation.benchmark.v2 import run_benchmark, task_sequence
from museum.evaluation.benchmark.v2.results import ALL_READINGS, interval
from museum.evaluation.independent import gap_closed
from museum.evaluation.prompt_following import read_placement
from museum.errors import MuseumError
from museum.museum import Museum
from museum.report.benchmark_report import write_report
from museum.world.v2.concepts import BENCHMARK_POOL, build_concept, spec

METHODS = ["textual-inversion", "finetune"]
CONCEPTS = ["sunburst", "gem", "glowline"]  # two objects whose placement can be read, and a style
FAST = dict(lr=2e-2, token_lr=0.5)
# 1 prompt x 2 images per concept, 2 denoising steps, 2 training steps, 4 generality prompts, 1 pair
RUN = dict(steps=2, n_prompts=1, n_seeds=2, gen_steps=2, n_ref=4, generality_prompts=4, n_pairs=1, progress=False,
           method_overrides={m: FAST for m in METHODS})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tiny_v2_base, v2_evaluator, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-v2") / "out"
    results = run_benchmark(METHODS, CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, seeds=2, **RUN)
    return out, results


def cells(R):
    return [(t, j) for t in range(len(R)) for j in range(len(R))]


def assert_same_matrix(a, b, what=""):
    assert len(a) == len(b), what
    for row, expected in zip(a, b):
        assert row == pytest.approx(expected, abs=1e-6), what


# ----------------------------------------------------------------------------- the task sequence and pairs


def test_task_sequence_puts_a_style_every_third_task():
    ten = task_sequence(10)
    assert [spec(n).kind for n in ten].count("style") == 3 and ten[2] == "glowline"
    assert sorted(task_sequence(32)) == sorted(BENCHMARK_POOL)
    with pytest.raises(BenchmarkError, match="1 to 32 tasks"):
        task_sequence(33)


def test_pairs_are_readable_and_span_the_sequence():
    pairs = M.composition_pairs(task_sequence(10), 4)
    assert len(pairs) == 4 and pairs[0][:2] == ("sunburst", "gem")  # the first and the last object
    assert all(spec(a).kind == spec(b).kind == "object" for a, b, _ in pairs)
    assert ("sunburst", "rainbow") not in [p[:2] for p in M.composition_pairs(["sunburst", "rainbow"], 1)]
    for a, b, ground in pairs:  # a perfect method is read as placed
        scene = M.pair_scene(a, b, ground)
        assert all(read_placement(im, scene)["placed"] for im in M.pair_renders(scene))
        assert M.pair_prompt(scene, ("<x> circle", "<y> square")).startswith("on the left a small <x> circle and on the right a small")


def test_interval_is_the_t_interval():
    iv = interval([1.0, 2.0, None, 3.0, float("nan")])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert iv == pytest.approx({"mean": 2.0, "low": 2.0 - half, "high": 2.0 + half, "n": 3})
    assert interval([0.4]) == {"mean": 0.4, "low": None, "high": None, "n": 1}  # one seed: no interval
    assert interval([None]) is None


# ----------------------------------------------------------------------------- a run


def test_results_per_seed_and_over_seeds(bench):
    out, results = bench
    assert json.loads((out / "results.json").read_text())["version"] == 2 and results["concepts"] == CONCEPTS
    excluded = results["base"]["excluded"]
    for method, r in results["methods"].items():
        assert r["complete"] and list(r["seeds"]) == ["0", "1"]
        for reading in ALL_READINGS:
            for block in r["seeds"].values():
                R = block["R"][reading]
                for t, j in cells(R):
                    gone = reading in excluded and CONCEPTS[j] in excluded[reading]
                    assert (R[t][j] is None) == (j > t or gone), (method, reading, t, j)
            A = [b["summary"][reading]["A"] for b in r["seeds"].values()]
            iv = r["summary"][reading]["A"]
            assert iv["mean"] == pytest.approx(np.mean(A)) and iv["n"] == 2 and iv["low"] <= iv["mean"] <= iv["high"]
    assert results["base"]["concepts"] == CONCEPTS


def test_gap_closed_is_read_between_the_anchors(bench):
    _, results = bench
    anchors = results["base"]["anchors"]["sunburst"]
    R = results["methods"]["finetune"]["seeds"]["1"]["R"]
    for gap, reading in M.GAPS.items():
        expected = gap_closed(R[reading][2][0], anchors["class_prompt"][reading], anchors["upper"][reading])
        if math.isfinite(expected):
            assert R[gap][2][0] == pytest.approx(expected)
        else:
            assert R[gap][2][0] is None and "sunburst" in results["base"]["excluded"][gap]


def test_training_seeds_differ_and_the_upper_bound_starts_as_the_sequence(bench):
    out, results = bench
    r = results["methods"]["finetune"]
    assert r["seeds"]["0"]["R"]["independent"][2] != r["seeds"]["1"]["R"]["independent"][2]  # the training's seed
    for k in ("0", "1"):  # the first concept alone is the same run as the first task, with the same seed
        alone = json.loads((out / "finetune" / "upper" / f"seed-{k}" / "progress.json").read_text())
        assert alone["concepts"]["sunburst"]["scores"]["independent"] == pytest.approx(
            r["seeds"][k]["R"]["independent"][0][0])


def test_an_independent_methods_upper_bound_is_its_own_task_readings(bench):
    """Textual inversion declares ``Method.independent``: no upper-bound unit runs for it (finetune's does), and its
    upper bound is, per concept and reading, the interval over seeds of R[t][t] of its sequences."""
    out, results = bench
    units = sorted(p.stem for p in (out / ".claims").glob("*.lock"))
    assert [u for u in units if ".upper." in u] == ["finetune.upper.seed-0", "finetune.upper.seed-1"]
    assert not (out / "textual-inversion" / "upper").exists()
    r = results["methods"]["textual-inversion"]
    upper, seeds = r["upper_bound"], r["seeds"].values()
    assert upper["source"] == "own-task readings (independent method)" and upper["concepts"] == CONCEPTS
    assert results["methods"]["finetune"]["upper_bound"]["source"] == "each concept learned alone"
    for reading in ALL_READINGS:
        for j, c in enumerate(CONCEPTS):
            assert upper["final"][reading][c] == interval(b["R"][reading][j][j] for b in seeds), (reading, c)
        assert upper["summary"][reading] == pytest.approx(r["summary"][reading]["own"])


def test_textual_inversion_forgets_nothing_and_keeps_the_base_vocabulary(bench):
    """A token-only method leaves earlier concepts' images and every prompt without its tokens bit-identical: F and
    BWT are 0 in every reading, and the base vocabulary's prompt following is the base model's exactly."""
    _, results = bench
    r = results["methods"]["textual-inversion"]
    for reading in ALL_READINGS:
        for block in r["seeds"].values():
            assert block["summary"][reading]["F"] in (0.0, None) and block["summary"][reading]["BWT"] in (0.0, None)
    g = r["generality"]
    assert g["tasks"] == [0, 1, 2, 3] and g["drop"]["mean"] == 0.0
    assert all(v["mean"] == results["base"]["generality"]["mean"] for v in g["mean"])
    finetune = results["methods"]["finetune"]["generality"]
    assert finetune["drop"]["mean"] == pytest.approx(
        results["base"]["generality"]["mean"] - np.mean([b["generality"]["final"]["mean"]
                                                         for b in results["methods"]["finetune"]["seeds"].values()]))


def test_pairs_are_read_after_the_last_task(bench):
    _, results = bench
    base = results["base"]["composition"]["sunburst+gem"]
    assert base["renders"]["placed"] == 1.0 and set(base["class_words"]["halves"]) == {"sunburst", "gem"}
    for r in results["methods"].values():
        pair = r["composition"]["pairs"]["sunburst+gem"]
        assert 0.0 <= pair["placed"]["mean"] <= 1.0 and pair["anchors"]["renders"] == 1.0
        assert set(pair["halves"]) == {"sunburst", "gem"}
        assert all(pair["halves"][c]["independent"]["n"] == 2 for c in pair["halves"])


def test_times_are_recorded(bench):
    out, results = bench
    for r in results["methods"].values():
        assert r["cpu_seconds"]["mean"] > 0 and r["learn_cpu_seconds"]["mean"] > 0
    assert results["methods"]["finetune"]["upper_bound"]["cpu_seconds"]["mean"] > 0
    assert results["methods"]["textual-inversion"]["upper_bound"]["cpu_seconds"] is None  # no unit of its own
    task = json.loads((out / "finetune" / "seed-0" / "progress.json").read_text())["tasks"][1]
    assert task["learning"]["cpu_seconds"] > 0 and task["reading"]["wall_seconds"] > 0


def test_rerun_changes_nothing_and_other_settings_are_refused(bench, tiny_v2_base, v2_evaluator):
    out, results = bench
    progress = {p: p.read_bytes() for p in out.rglob("progress.json")}
    # base; per method and seed its sequence; finetune's upper bound and joint oracle per seed
    assert len(progress) == 1 + 2 * len(METHODS) + 2 + 2
    again = run_benchmark(METHODS, CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, seeds=2, **RUN)
    assert {p: p.read_bytes() for p in out.rglob("progress.json")} == progress
    assert again["methods"] == results["methods"]
    with pytest.raises(BenchmarkError, match="n_seeds: 2 there, 1 now"):
        run_benchmark(METHODS, CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, seeds=2,
                      **dict(RUN, n_seeds=1))
    one = run_benchmark(METHODS, CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, seeds=1, **RUN)
    assert list(one["methods"]["finetune"]["seeds"]) == ["0"] and one["methods"]["finetune"]["summary"][
        "independent"]["A"]["low"] is None  # one seed asked for: no interval
    run_benchmark(METHODS, CONCEPTS, out, base=tiny_v2_base, evaluator=v2_evaluator, seeds=2, **RUN)  # as it was


def test_joint_oracle_where_a_method_can(bench):
    """Finetune learns every concept in one run (one museum, one commit, one shared LoRA), read as a last task is;
    textual inversion declares no joint form (its upper bound is its oracle)."""
    out, results = bench
    assert results["methods"]["textual-inversion"]["joint"] is None
    joint = results["methods"]["finetune"]["joint"]
    assert joint["concepts"] == CONCEPTS and joint["summary"]["independent"]["n"] == 2
    assert joint["generality"]["tasks"] == [0, 3] and joint["composition"]["pairs"]["sunburst+gem"]["placed"]["n"] == 2
    m = Museum.open(out / "finetune" / "joint" / "seed-1" / "museum")
    assert [(c.name, c.method) for c in m.concepts] == [(c, "finetune") for c in CONCEPTS]
    assert [p.name for p in (m.folder / "state").iterdir()] == ["finetune-002.safetensors"]
    progress = json.loads((out / "finetune" / "joint" / "seed-1" / "progress.json").read_text())
    assert progress["learning"]["cpu_seconds"] > 0 and set(progress["scores"]) == set(CONCEPTS)


def test_learn_together(tiny_v2_base, tmp_path):
    """Custom Diffusion learned together: every concept keeps the run's K/V deltas and its own token, with class
    images of each concept's class; a method without a joint form is refused, naming those with one."""
    concepts = [build_concept(n, n_train=2, n_ref=1) for n in ("sunburst", "gem")]
    m = Museum.init(tmp_path / "museum", base=tiny_v2_base)
    learned = m.learn_together([(c.name, c.train_images, c.class_word, False) for c in concepts],
                               method="custom-diffusion", steps=2, num_class_images=2, progress=False)
    assert [c.phrase for c in learned] == ["<sunburst> circle", "<gem> diamond"]
    tensors = [load_file(c.path / "tensors.safetensors") for c in learned]
    deltas = [k for k in tensors[0] if k.startswith("delta.")]
    assert deltas and all(torch.equal(tensors[0][k], tensors[1][k]) for k in deltas)
    assert not torch.equal(tensors[0]["<sunburst>"], tensors[1]["<gem>"])
    assert [p.name.split("-")[0] for p in (m.folder / "cache" / "class_images").iterdir()] == ["circle+diamond"]
    with pytest.raises(MuseumError, match="c-lora cannot learn several concepts at once; these can: custom-diffusion, "
                                          "finetune"):
        m.learn_together([("other", concepts[0].train_images, "circle", False)], method="c-lora")


# ----------------------------------------------------------------------------- reading every N tasks, resuming


def test_reading_every_two_tasks(tiny_v2_base, v2_evaluator, tmp_path):
    """The long run's mode: the new concept after each task, every concept after tasks 2 and 4."""
    results = run_benchmark(["textual-inversion"], [*CONCEPTS, "checker"], tmp_path, base=tiny_v2_base,
                            evaluator=v2_evaluator, seeds=1, upper_bound=False, base_row=False, score_every=2, **RUN)
    block = results["methods"]["textual-inversion"]["seeds"]["0"]
    R = block["R"]["independent"]
    assert [[v is not None for v in row] for row in R] == [
        [True, False, False, False], [True, True, False, False], [False, False, True, False], [True] * 4]
    assert block["curves"]["independent"]["tasks"] == [2, 4] and block["generality"]["tasks"] == [2, 4]
    assert [g["concepts"] for g in block["grids"]] == [["sunburst"], CONCEPTS[:2], ["glowline"], [*CONCEPTS, "checker"]]
    assert block["summary"]["independent"]["F"] == 0.0  # textual inversion, read again after task 4


def test_interrupted_run_continues_as_an_uninterrupted_one(bench, tiny_v2_base, v2_evaluator, tmp_path, monkeypatch):
    kw = dict(RUN, base=tiny_v2_base, evaluator=v2_evaluator, seeds=1, upper_bound=False, base_row=False)
    original = v2_run._Run.draw

    def interrupt(self, m, name):
        if name == CONCEPTS[1]:
            raise KeyboardInterrupt
        return original(self, m, name)

    monkeypatch.setattr(v2_run._Run, "draw", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(["textual-inversion"], CONCEPTS, tmp_path, **kw)
    monkeypatch.setattr(v2_run._Run, "draw", original)
    path = tmp_path / "textual-inversion" / "seed-0" / "progress.json"
    assert [t["task"] for t in json.loads(path.read_text())["tasks"]] == [0]
    results = run_benchmark(["textual-inversion"], CONCEPTS, tmp_path, **kw)
    tasks = json.loads(path.read_text())["tasks"]
    assert [t["task"] for t in tasks] == [0, 1, 2] and tasks[1]["learning"] is None  # learned before, not again
    expected = bench[1]["methods"]["textual-inversion"]["seeds"]["0"]["R"]
    for reading in M.READINGS:
        assert_same_matrix(results["methods"]["textual-inversion"]["seeds"]["0"]["R"][reading], expected[reading],
                           reading)


SHARED_RUN = """
import os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # the tests, and this checkout's museum
import test_benchmark_v2 as tb
from tiny_models import tiny_v2_evaluator
from museum.evaluation.benchmark.v2 import run_benchmark
evaluator = tiny_v2_evaluator(Path(sys.argv[4]) / os.environ["LOCAL_RANK"])  # one tokenizer folder per process
run_benchmark(["textual-inversion"], tb.CONCEPTS[:2], Path(sys.argv[2]), base=sys.argv[3], evaluator=evaluator,
              seeds=2, upper_bound=False, **tb.RUN)
"""


def test_two_processes_share_the_seeds_and_match_one(bench, tiny_v2_base, tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    script = tmp_path / "shared_run.py"
    script.write_text(SHARED_RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(launch + [str(script), str(Path(__file__).parent), str(tmp_path / "out"), str(tiny_v2_base),
                                    str(tmp_path / "evaluator")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    taken = re.findall(r"process (\d)/2 ran (\S+)", proc.stdout + proc.stderr)
    assert sorted(u for _, u in taken) == ["base", "textual-inversion.seed-0", "textual-inversion.seed-1"]
    assert {p for p, _ in taken} == {"1", "2"}
    shared = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["textual-inversion"]["seeds"]
    for k in ("0", "1"):  # the first two tasks of the one-process run, read the same
        expected = bench[1]["methods"]["textual-inversion"]["seeds"][k]["R"]
        for reading in ALL_READINGS:
            assert_same_matrix(shared[k]["R"][reading], [row[:2] for row in expected[reading][:2]], reading)


# ----------------------------------------------------------------------------- the report and the command


def test_report(bench):
    out, _ = bench
    text = write_report(out).read_text()
    table = re.search(r'<table id="results">.*?</table>', text, re.S).group(0)
    assert re.findall(r"<tr><td>(.*?)</td>", table) == [*METHODS, *(f"alone: {m}" for m in METHODS),
                                                        "joint: finetune", "base model (class prompt)"]
    assert re.search(r"<td>-?\d\.\d{3} ± \d\.\d{3}</td>", table)  # intervals over the two seeds
    for reading in M.GAPS:
        rows = re.findall(r"<tr><td>(.*?)</td>", re.search(rf'<table id="concepts-{reading}">.*?</table>', text,
                                                          re.S).group(0))
        assert rows == [*METHODS, *(f"alone: {m}" for m in METHODS), "joint: finetune"]
    for method, alone in (("finetune", 1), ("textual-inversion", 0)):  # textual inversion's alone: its own task's
        samples = re.search(rf'<table id="samples-{method}" class="samples">.*?</table>', text, re.S).group(0)
        assert re.findall(r"<tr><td>([^<]*)</td>", samples) == CONCEPTS
        assert [len(re.findall("<img ", row)) for row in re.findall(r"<tr><td>.*?</tr>", samples)] == [4 + alone] * 3
    assert "for textual-inversion, whose concepts are independent of one another" in text
    generality = re.search(r'<table id="generality">.*?</table>', text, re.S).group(0)
    assert len(re.findall("<tr><td>", generality)) == 1 + len(METHODS)
    assert len(re.findall("<tr><td>", re.search(r'<table id="composition">.*?</table>', text, re.S).group(0))) == 2
    assert "Every figure is the mean over 2 training seeds" in text


def test_bench_command_runs_world_v2(bench, tiny_v2_base, v2_evaluator, monkeypatch, capsys, tmp_path):
    out, _ = bench
    v2_evaluator.save_pretrained(tmp_path / "evaluator")
    seen = {}
    monkeypatch.setattr(v2_package, "run_benchmark", lambda *args, **kw: seen.update(args=args, kw=kw))
    monkeypatch.setattr(sys, "argv", ["museum", "bench", "--world", "v2", "--methods", "finetune,c-lora", "--seeds",
                                      "2", "--tasks", "30", "--score-every", "5", "--generality-prompts", "200",
                                      "--base", str(tiny_v2_base),
                                      "--evaluator", str(tmp_path / "evaluator"), "--out", str(out)])
    cli.main()
    assert seen["args"] == (["finetune", "c-lora"], 30, out)
    assert {k: seen["kw"][k] for k in ("seeds", "score_every", "upper_bound", "joint", "generality_prompts")} == {
        "seeds": 2, "score_every": 5, "upper_bound": True, "joint": True, "generality_prompts": 200}
    assert str(out / "report.html") in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--seeds", "2"], "--seeds and --score-every need --world v2"),
    (["--world", "v2", "--tasks", "33"], "--tasks must be between 1 and 32"),
    (["--world", "v3"], "--world must be one of v1, v2"),
    (["--world", "v2", "--base", "/nowhere"], "World v2's model is not at /nowhere"),
])
def test_bench_command_rejects_bad_options(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["museum", "bench", "--out", str(tmp_path / "b"), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
