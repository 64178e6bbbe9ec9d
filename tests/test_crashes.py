"""Crashes (issue 9): every command killed with SIGKILL, either at a named fault point (``museum.store.faults``;
the child kills itself, as ``kill -9`` would) or from the parent after a random delay, in a forked child process
(``reliability_support``); one test does the same to a freshly exec'd ``python -m museum``. After every kill the
museum lists and draws what it committed, and a rerun finishes the job. Also a full disk while committing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tqdm.auto import tqdm

from museum.museum import Museum
from reliability_support import (
    FAST, assert_works, cli, committed_files, error_lines, fork, fork_cli, leftovers, manifest_names, report, spawn,
)

pytestmark = pytest.mark.usefixtures("warm_imports")  # forked children start at once

LEARN_STEPS, CHECKPOINT_EVERY = 6, 2
METHODS = ("c-lora", "textual-inversion", "finetune")
CLASS_WORDS = {"sunburst": "circle", "checker": "square", "neon": "style"}
PHASES = ("training", "checkpointing", "final save", "merge")


# ----------------------------------------------------------------------------- fault points

def phases_of(trace: list[str]) -> list[str]:
    """The phase each traced point belongs to (what a kill right after it interrupts)."""
    phase, out = "loading", []
    for name in trace:
        if name in ("train.start", "train.step", "checkpoint.done"):
            phase = "training"
        elif name == "checkpoint.begin":
            phase = "checkpointing"
        elif name in ("train.finished", "commit.begin"):
            phase = "final save"
        elif name == "export.begin":
            phase = "merge"
        out.append(phase)
    return out


def resumed_trace(straight: list[str], checkpoint_step: int | None) -> list[str]:
    """The points a run resumed from ``checkpoint_step`` passes: those of the uninterrupted run after it."""
    if not checkpoint_step:
        return straight
    n = checkpoint_step // CHECKPOINT_EVERY
    done = [i for i, p in enumerate(straight) if p == "checkpoint.done"]
    return ["train.start", *straight[done[n - 1] + 1:]]


def spec_at(trace: list[str], i: int) -> str:
    return f"{trace[i]}:{trace[:i + 1].count(trace[i])}"


def latest_checkpoint(folder: Path, name: str) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in (folder / "work" / name).glob("checkpoint-*")
             if (p / "step.json").is_file()]
    return max(steps, default=None)


def read_trace(path: Path) -> list[str]:
    return path.read_text().split() if path.is_file() else []


def run_fault_loop(tmp: Path, base: Path, images: dict, *, kills: int, seed: int, per_museum: int = 5) -> dict:
    """Learn concepts one after another, killing `museum learn` (and `museum merge`) at random points; after
    each kill check the museum, and finish the concept with `museum learn --resume`. Returns counts."""
    rng = random.Random(seed)
    straight_runs: dict[str, tuple[list[str], float]] = {}  # method -> (fault points passed, seconds)
    counts = {"kills": 0, "by_phase": {p: 0 for p in ("loading", *PHASES)}, "by_mode": {"fault point": 0, "timer": 0},
              "by_method": {m: 0 for m in METHODS}, "killed_after_commit": 0, "runs_not_killed": 0,
              "resumes_completed": 0, "resumed_equal_to_uninterrupted": 0, "concepts": 0, "museums": 0, "checks": 0,
              "merge_attempts": 0, "merge_outputs_complete": 0, "merge_outputs_absent": 0}
    started = time.time()
    cycle = 0
    folder, refs, names, n_in_museum = None, {}, [], per_museum
    method_of: dict[str, str] = {}
    k = 0
    while counts["kills"] < kills:
        if n_in_museum >= per_museum:  # a fresh museum keeps every check cheap
            folder = tmp / f"museum-{counts['museums']}"
            Museum.init(folder, base=base)
            counts["museums"] += 1
            refs, names, n_in_museum = {}, [], 0
        name = f"c{k}"
        method = METHODS[k % len(METHODS)]
        concept = list(images)[k % len(images)]
        k += 1
        learn = ["learn", folder, name, "--images", images[concept][0], "--method", method, "--steps", LEARN_STEPS,
                 "--checkpoint-every", CHECKPOINT_EVERY]
        learn += ["--style"] if CLASS_WORDS[concept] == "style" else ["--class-word", CLASS_WORDS[concept]]
        # the uninterrupted run, on a copy: its fault points and duration (the same for every concept of a method),
        # and the tensors the interrupted and resumed run must reach (checked for a third of the concepts: time)
        expected = None
        if method not in straight_runs or rng.random() < 1 / 3:
            scratch = tmp / "scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(folder, scratch)
            (tmp / "trace.txt").unlink(missing_ok=True)
            code, seconds = fork(lambda: cli(*[scratch if a == folder else a for a in learn]),
                                 env={"MUSEUM_FAULT_TRACE": str(tmp / "trace.txt")}, log=tmp / "straight.log")
            assert code == 0, (tmp / "straight.log").read_text()[-3000:]
            straight_runs[method] = (read_trace(tmp / "trace.txt"), seconds)
            expected = load_file(scratch / "concepts" / f"{len(names):03d}-{name}" / "tensors.safetensors")
            shutil.rmtree(scratch)
        straight, straight_seconds = straight_runs[method]

        committed = False
        for attempt in range(rng.randint(1, 4)):
            before = committed_files(folder)
            phase = PHASES[cycle % len(PHASES)]
            cycle += 1
            timer = rng.random() < 0.25
            ckpt = latest_checkpoint(folder, name)
            trace = resumed_trace(straight, ckpt)
            available = set(phases_of(trace))
            if phase == "merge" and len(names) < 2 or phase not in available | {"merge"}:
                phase = rng.choice(sorted(available - {"loading"}))
            (tmp / "killed.txt").unlink(missing_ok=True)
            env = {"MUSEUM_FAULT_TRACE": str(tmp / "killed.txt")}
            if phase == "merge":
                out = tmp / f"merge-{k}-{attempt}"
                args = ["merge", folder, *rng.sample(names, 2), "--out", out]
                points = ["export.begin", "export.partial", "atomic.dir.written", "atomic.dir.renamed"]
                if not timer:  # each in turn
                    env["MUSEUM_FAULT"] = f"{points[counts['merge_attempts'] % len(points)]}:1"
                counts["merge_attempts"] += 1
                code, _ = fork(lambda: cli(*args), env=env, log=tmp / "kill.log",
                               kill_after=rng.uniform(0, 0.6) if timer else None)
            else:
                args = learn + (["--resume"] if attempt else [])
                if not timer:
                    idx = [i for i, p in enumerate(phases_of(trace)) if p == phase]
                    env["MUSEUM_FAULT"] = spec_at(trace, rng.choice(idx))
                code, _ = fork(lambda: cli(*args), env=env, log=tmp / "kill.log",
                               kill_after=rng.uniform(0, straight_seconds) if timer else None)
            if code != -signal.SIGKILL:  # a timer that fired too late: the command finished
                assert code == 0, (tmp / "kill.log").read_text()[-3000:]
                counts["runs_not_killed"] += 1
            else:
                counts["kills"] += 1
                landed = phases_of(read_trace(tmp / "killed.txt"))
                counts["by_phase"][landed[-1] if landed else "loading"] += 1
                counts["by_mode"]["timer" if timer else "fault point"] += 1
                if phase != "merge":
                    counts["by_method"][method] += 1
            context = f"kill {counts['kills']} ({phase}, {'timer' if timer else env.get('MUSEUM_FAULT')}, {name})"
            now = manifest_names(folder)
            if phase == "merge":
                assert committed_files(folder) == before, context
                if out.exists():  # a merge's output is complete or absent
                    export = json.loads((out / "museum_export.json").read_text())
                    assert [c["name"] for c in export["concepts"]] == args[2:4], context
                    counts["merge_outputs_complete"] += 1
                else:
                    counts["merge_outputs_absent"] += 1
            elif now == names + [name]:
                committed = True  # killed after the commit point: the concept is there, whole
                counts["killed_after_commit"] += code == -signal.SIGKILL
            else:
                assert now == names, context
                assert committed_files(folder) == before, f"{context}: the museum changed"
            if committed:  # a new C-LoRA / finetune concept rightly changes what the earlier ones of its method draw
                same = [n for n in refs if method_of[n] != method or method == "textual-inversion"]
                assert_works(folder, tmp / "check", {n: refs[n] for n in same}, now, rng, context)
            else:
                assert_works(folder, tmp / "check", refs, names, rng, context)
            counts["checks"] += 1
            if committed:
                break
        if not committed:
            assert fork_cli(*learn, "--resume", log=tmp / "resume.log") == 0, (tmp / "resume.log").read_text()[-3000:]
            counts["resumes_completed"] += 1
        names.append(name)
        method_of[name] = method
        if expected is not None:
            got = load_file(folder / "concepts" / f"{len(names) - 1:03d}-{name}" / "tensors.safetensors")
            assert got.keys() == expected.keys()
            for key in got:  # the interrupted and resumed concept is the uninterrupted one
                assert (got[key] - expected[key]).abs().max() < 1e-6, (name, key)
            counts["resumed_equal_to_uninterrupted"] += 1
        # (a kill between the commit and the removal of the checkpoints leaves them to the next learn to remove)
        assert leftovers(folder) in ([], [f"work/{name}"] if committed else []), leftovers(folder)
        refs = assert_works(folder, tmp / "check", {}, names, rng, f"after {name}")
        counts["checks"] += 1
        counts["concepts"] += 1
        n_in_museum += 1
    counts["seconds"] = round(time.time() - started, 1)
    return counts


def test_a_child_killed_inside_a_progress_bar_does_not_block_the_parent(tmp_path):
    """The harness itself: a child SIGKILLed while it holds tqdm's write lock (as a random kill can land)
    leaves the parent's next progress bar free (``own_progress_bar_lock``)."""
    tqdm(disable=True).close()  # the parent's lock exists before the fork, as after any earlier progress bar
    holding = tmp_path / "holding"

    def hold_the_lock():
        tqdm.get_lock().acquire()
        holding.touch()
        time.sleep(60)

    pid = spawn(hold_the_lock)
    deadline = time.time() + 60
    while not holding.exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert holding.exists(), "the child never took the lock"
    bar = threading.Thread(target=lambda: tqdm(disable=True).close(), daemon=True)
    bar.start()
    bar.join(timeout=10)
    assert not bar.is_alive(), "the parent's progress bar waits for a lock held by a dead child"


@pytest.mark.parametrize("kills, seed", [(10, 9)])
def test_kill_9_at_random_points(tiny_base, concept_images, tmp_path, kills, seed):
    """Fast variant of the crash test (the 60-kill loop is test_kill_9_at_random_points_full, marked slow)."""
    counts = run_fault_loop(tmp_path, tiny_base, concept_images, kills=kills, seed=seed)
    report("kill -9 loop", counts)
    assert counts["kills"] >= kills
    assert all(counts["by_phase"][p] > 0 for p in ("training", "final save")), counts


@pytest.mark.slow
def test_kill_9_at_random_points_full(tiny_base, concept_images, tmp_path):
    counts = run_fault_loop(tmp_path, tiny_base, concept_images, kills=60, seed=2024)
    report("kill -9 loop (full)", counts)
    assert counts["kills"] >= 60
    assert all(counts["by_phase"][p] > 0 for p in PHASES), counts
    assert counts["by_mode"]["timer"] > 0 and counts["by_mode"]["fault point"] > 0


@pytest.mark.slow
def test_kill_9_of_a_fresh_museum_process(tiny_base, concept_images, tmp_path):
    """The same through the installed entry point: `python -m museum learn`, SIGKILLed while committing."""
    folder = tmp_path / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle", **FAST)
    before = committed_files(folder)
    env = dict(os.environ, MUSEUM_FAULT="commit.folder", OMP_NUM_THREADS="1")

    r = subprocess.run([sys.executable, "-m", "museum", "learn", str(folder), "checker", "--images",
                        str(concept_images["checker"][0]), "--class-word", "square", "--method", "c-lora", "--steps",
                        "4", "--checkpoint-every", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert committed_files(folder) == before and manifest_names(folder) == ["sunburst"]
    assert (folder / "concepts" / "001-checker").is_dir()  # written, but never committed: invisible
    images = assert_works(folder, tmp_path / "check", {}, ["sunburst"], random.Random(0), "after the kill")
    assert fork_cli("learn", folder, "checker", "--images", concept_images["checker"][0], "--class-word", "square",
                    "--method", "c-lora", "--steps", 4, "--checkpoint-every", 2, "--resume") == 0
    assert_works(folder, tmp_path / "check", {"sunburst": images["sunburst"]}, ["sunburst", "checker"],
                 random.Random(0), "after the resume")
    assert leftovers(folder) == []


@pytest.mark.parametrize("point", ["atomic.file.written", "atomic.file.renamed", "commit.remove"])
def test_kill_9_during_remove(two_concept_museum, concept_images, tmp_path, point):
    """`museum remove` killed before, at and after its commit: the concept is there or gone, never half."""
    m, images = two_concept_museum
    log = tmp_path / "remove.log"
    code = fork_cli("remove", m.folder, "checker", env={"MUSEUM_FAULT": point}, log=log)
    assert code == -signal.SIGKILL, log.read_text()
    names = manifest_names(m.folder)
    assert names in (["sunburst", "checker"], ["sunburst"])
    refs = {"sunburst": images["sunburst"], **({"checker": images["checker"]} if len(names) == 2 else {})}
    assert_works(m.folder, tmp_path / "check", refs, names, random.Random(0), f"remove killed at {point}")
    if len(names) == 2:
        assert fork_cli("remove", m.folder, "checker") == 0
        assert leftovers(m.folder) == []
    else:  # the next writer removes what the killed one left
        assert fork_cli("learn", m.folder, "neon", "--images", concept_images["neon"][0], "--style", "--method",
                        "textual-inversion", "--steps", 2) == 0
        assert manifest_names(m.folder) == ["sunburst", "neon"] and leftovers(m.folder) == []


def test_full_disk_while_committing(tiny_base, concept_images, tmp_path):
    """A write that fails (no space left) at any commit step: one error line, the museum as it was, and the
    next learn works."""
    folder = tmp_path / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="finetune", class_word="circle", **FAST)
    learn = ["learn", folder, "checker", "--images", concept_images["checker"][0], "--class-word", "square",
             "--method", "finetune", "--steps", 2]
    # the concept's folder, its tensors, the method's state file, the manifest
    for point in ("atomic.dir.written:1", "commit.partial:1", "atomic.file.written:1", "atomic.file.written:2"):
        before = committed_files(folder)
        log = tmp_path / f"{point}.log"
        assert fork_cli(*learn, env={"MUSEUM_FAULT": f"{point}:enospc"}, log=log) == 2
        lines = error_lines(log)
        assert len(lines) == 1 and "No space left on device" in lines[0] and "museum is as it was" in lines[0]
        assert committed_files(folder) == before, point
        assert not list(folder.glob(".tmp-*")) and not list((folder / "state").glob(".tmp-*")), point
    assert fork_cli(*learn) == 0
    assert manifest_names(folder) == ["sunburst", "checker"] and leftovers(folder) == []
