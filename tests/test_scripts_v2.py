"""The World v2 measuring scripts run end to end on tiny models and write what their docs say."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_measure_learning_v2_tries_a_grid_on_the_tuning_pool(tiny_v2_base, v2_evaluator, tmp_path):
    v2_evaluator.save_pretrained(tmp_path / "evaluator")
    out = tmp_path / "tuning.json"
    table = run_script("scripts/measure_learning_v2.py", "--pool", "tuning", "--concepts", "bullseye",
                       "--methods", "textual-inversion", "--around", "token_lr", "--set", "steps=2", "--seeds", "2",
                       "--pipeline", str(tiny_v2_base), "--evaluator", str(tmp_path / "evaluator"), "--out", str(out))
    results = json.loads(out.read_text())
    runs = list(results["methods"])
    assert runs == [f"textual-inversion token_lr={v:g}" for v in (0.005, 0.01, 0.02)]
    for run in runs:
        for name, seeds in results["methods"][run].items():
            assert [row["seed"] for row in seeds] == [0, 1]
            for row in seeds:
                assert set(row["gap_closed"]) == {"evaluator", "independent"} and 0 <= row["recognition"] <= 1
                assert row["steps"] == 2 and row["upper"]["independent"] > 0
                assert -1 <= row["text_alignment"] <= 1 and row["bytes"] > 0
    assert set(results["base_text_alignment"]) == {"bullseye"}
    assert results["settings"][runs[0]] == {"method": "textual-inversion", "steps": 2, "token_lr": 0.005}
    assert table.count("(best)") <= 2 and "| textual-inversion token_lr=0.01 |" in table.replace(" (best)", "")
    recognition = [line.split("|")[6] for line in table.splitlines() if line.startswith("| textual-inversion")]
    assert len(recognition) == 3
    assert all(re.fullmatch(r" [0-9.]+ \[[-0-9.]+, [-0-9.]+\] ", cell) for cell in recognition), table  # over 2 seeds


def test_measure_learning_v2_refuses_to_tune_on_the_benchmark_pool(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "scripts/measure_learning_v2.py", "--pool", "benchmark", "--around", "lr",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "tuning pool only" in done.stderr


def test_measure_user_concepts_reads_pictures_from_outside_the_world(tiny_v2_base, tmp_path):
    out = tmp_path / "user.json"
    run_script("scripts/measure_user_concepts.py", "--pipeline", str(tiny_v2_base), "--concepts", "mug", "duotone",
               "--methods", "textual-inversion", "--set", "steps=2", "--per-prompt", "1", "--out", str(out))
    results = json.loads(out.read_text())
    assert results["resolution"] == 64 and list(results["concepts"]) == ["mug", "duotone"]
    for name, row in results["concepts"].items():
        assert 0 < row["anchors"]["base"] < row["anchors"]["upper"] <= 1, name  # the tiny model draws no mug
        learned = row["methods"]["textual-inversion"]
        assert learned["steps"] == 2 and 0 < learned["reading"] <= 1
        if not math.isnan(learned["gap_closed"]):
            assert learned["gap_closed"] == pytest.approx((learned["reading"] - row["anchors"]["base"])
                                                          / (row["anchors"]["upper"] - row["anchors"]["base"]))
    assert out.with_suffix(".png").is_file()
    pictures = ROOT / "docs/world-v2/user-concepts"
    for name in ("mug", "duotone"):  # the held-out references are other pictures than the training ones
        held_out = {p.read_bytes() for p in (pictures.with_name("user-concepts-held-out") / name).glob("*.png")}
        assert len(held_out) == 4 and not held_out & {p.read_bytes() for p in (pictures / name).glob("*.png")}
    table = run_script("scripts/measure_user_concepts.py", "--compare", str(out), str(out))
    assert "| textual-inversion | objects |" in table and "| textual-inversion | styles |" in table


def test_check_independent_v2_reads_every_concept_of_a_pool(tmp_path):
    run_script("scripts/check_independent_v2.py", "--pool", "tuning", "--out", str(tmp_path / "check.json"))
    rows = json.loads((tmp_path / "check.json").read_text())["concepts"]
    assert len(rows) == 8
    for name, row in rows.items():
        assert row["upper"] > row["other_looks"], name  # the anchor is above other looks of the class
        assert math.isnan(row["training_images_gap_closed"]) == (row["upper"] - row["other_looks"] < 0.02)


def test_bench_base_model_v2_reads_every_attribute_both_ways_and_times_against_a_reference(
        tiny_v2_base, v2_evaluator, tmp_path):
    v2_evaluator.save_pretrained(tmp_path / "evaluator")
    run_script("scripts/bench_base_model_v2.py", "--pipeline", str(tiny_v2_base), "--evaluator",
               str(tmp_path / "evaluator"), "--reference", str(tiny_v2_base), "--prompts", "12", "--pairs", "3",
               "--timing-runs", "1", "--threads", "1", "--out", str(tmp_path / "out"))
    readings = json.loads((tmp_path / "out" / "base_model.json").read_text())["readings"]
    for name in ("generated", "renders", "vae_round_trip"):
        assert {"shape", "colour", "pattern", "background", "style", "colour, pixels",
                "background, pixels", "pattern, pixels"} <= set(readings[name])
        assert readings[name]["shape"]["n"] == 12 and readings[name]["background, pixels"]["n"] <= 12
    assert readings["renders"]["background, pixels"]["accuracy"] == 1.0  # the pixel reading is exact on renders
    assert readings["pairs"]["renders"]["accuracy"] == 1.0 and readings["pairs"]["generated"]["n"] == 3
    assert readings["timing_s"]["ratio"] > 0
    page = (tmp_path / "out" / "BASE_MODEL.md").read_text()
    assert "| background, pixels (no learned model) |" in page and "| pattern, pixels (no learned model) |" in page and "the issue allows 3x" in page


def test_peek_ground_check_tells_a_ground_that_follows_the_seed_from_one_that_follows_the_word(monkeypatch):
    from PIL import Image
    peek = _peek_module()
    colours = {"blue": (0, 0, 255), "yellow": (255, 255, 0), "grass": (60, 120, 40)}

    def by_word(pipe, prompts, seeds, steps):
        return [Image.new("RGB", (64, 64), colours[p.split(" on a ")[1].split()[0]]) for p in prompts]

    def by_seed(pipe, prompts, seeds, steps):
        return [Image.new("RGB", (64, 64), (40 * s, 0, 255 - 40 * s)) for s in seeds]
    monkeypatch.setattr(peek, "generate_images", by_word)
    words = peek.ground_variances(None, 1)
    monkeypatch.setattr(peek, "generate_images", by_seed)
    seeds = peek.ground_variances(None, 1)
    assert words["between seeds"] == 0 < words["between words"]
    assert seeds["between words"] == 0 < seeds["between seeds"]


def _peek_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("peek", ROOT / "scripts" / "peek_pretrain_v2.py")
    peek = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peek)
    return peek


@pytest.mark.parametrize("mirror", [False, True])
def test_peek_placement_counts_placed_and_mirrored_pairs(monkeypatch, mirror):
    """Renders of the prompts' scenes stand in for samples: all placed; drawn mirrored, all mirrored."""
    from dataclasses import replace
    from museum.evaluation import prompt_following as PF
    from museum.world.v2 import render
    peek = _peek_module()
    scenes = {render.caption(s): s for s in PF.readable_pairs(6, seed=778)}

    def draw(pipe, prompts, seeds, steps):
        out = []
        for p, k in zip(prompts, seeds):
            s = scenes[p]
            if mirror:
                s = replace(s, position=s.companion.position, companion=replace(s.companion, position=s.position))
            out.append(render.render(s, k))
        return out
    monkeypatch.setattr(peek, "generate_images", draw)
    counts = peek.placement(None, 6, 1)
    assert counts == ({"pairs": 6, "placed": 0, "mirrored": 6} if mirror else {"pairs": 6, "placed": 6, "mirrored": 0})


def test_check_evaluator_tower_trains_each_layout_to_name_the_pattern(tmp_path):
    out = tmp_path / "tower.json"
    run_script("scripts/check_evaluator_tower.py", "--train", "24", "--test", "12", "--steps", "2", "--batch", "4",
               "--report", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["layouts"]) == {"strided", "stem"} and result["test"] == 12
    for layout in result["layouts"].values():
        assert set(layout["accuracy"]) == {"1", "2"} and all(0 <= a <= 1 for a in layout["accuracy"].values())
        assert layout["seconds_per_step"] > 0


def test_check_evaluator_v2_reads_renders_of_held_out_prompts_and_of_every_pool_concept(v2_evaluator, tmp_path):
    v2_evaluator.save_pretrained(tmp_path / "evaluator")
    out = tmp_path / "evaluator.json"
    table = run_script("scripts/check_evaluator_v2.py", "--evaluator", str(tmp_path / "evaluator"), "--prompts", "12",
                       "--pools", "tuning", "--per-prompt", "1", "--out", str(out))
    result = json.loads(out.read_text())
    following = result["prompt_following"]
    assert {"shape", "colour", "pattern", "background", "style"} <= set(following) and following["shape"]["n"] == 12
    assert 0 < following["style, styled prompts only"]["n"] < 12
    assert set(result["recognition"]) == {"tuning"} and len(result["recognition"]["tuning"]) == 8
    assert all(0 <= v <= 1 for v in result["recognition"]["tuning"].values())
    assert "| recognition, tuning pool, objects (6) |" in table and "| recognition, tuning pool, styles (2) |" in table
