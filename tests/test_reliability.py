"""Reliability (issue 9): nothing lost under crashes, concurrent use and hostile input.

Crash tests run every command in a real child process (``os.fork`` of the test process, which
has already imported torch and diffusers, so a child starts in milliseconds instead of the
15 s a fresh ``python -m museum`` takes here) and kill it with SIGKILL, either at a named
fault point (``museum.store.faults``; the child kills itself, as ``kill -9`` would) or from the
parent after a random delay. One test does the same to a freshly exec'd ``python -m museum``.
docs/RELIABILITY.md lists every fault, its test and the result.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import museum_snapshot
from museum.errors import BaseModelError, ImageFolderError, MuseumError, TrainingDivergedError
from museum.museum import Museum

FAST = dict(steps=2, progress=False)
LEARN_STEPS, CHECKPOINT_EVERY = 6, 2
METHODS = ("c-lora", "textual-inversion", "finetune")
CLASS_WORDS = {"sunburst": "circle", "checker": "square", "neon": "style"}
PHASES = ("training", "checkpointing", "final save", "merge")


# ----------------------------------------------------------------------------- child processes

def spawn(fn, *, env: dict | None = None, log: Path | None = None) -> int:
    """Start ``fn()`` in a forked child process; return its pid (its exit code is what ``fn`` returns)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)  # not pytest's capture objects
            sys.stderr = open(2, "w", closefd=False)
            import torch

            torch.set_num_threads(1)  # the parent's thread pool is not inherited; 1 thread is also faster here
            own_progress_bar_lock()
            os.environ.update(env or {})
            code = fn() or 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return pid


def own_progress_bar_lock() -> None:
    """Give a forked child its own tqdm write lock. tqdm's default lock includes a multiprocessing semaphore
    that forked processes share: a child SIGKILLed while it held it (a progress bar being created) left the
    parent waiting for it forever at its next progress bar."""
    import threading

    from tqdm import std

    pending = [std.tqdm]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "_lock" in vars(cls) or cls is std.tqdm:
            cls.set_lock(threading.RLock())


def wait(pid: int, *, kill_after: float | None = None, timeout: float = 300) -> tuple[int, float]:
    """Wait for a child; return (exit code, or -signal if killed; seconds).

    ``kill_after``: the parent sends SIGKILL after that many seconds if the child still runs."""
    start = time.time()
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.time() - start
        elapsed = time.time() - start
        if kill_after is not None and not killed and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            killed = True
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child process ran longer than {timeout}s")
        time.sleep(0.002 if kill_after is not None else 0.01)


def fork(fn, *, env: dict | None = None, log: Path | None = None, kill_after: float | None = None,
         timeout: float = 300) -> tuple[int, float]:
    """Run ``fn()`` in a forked child process and wait for it (see ``wait``)."""
    return wait(spawn(fn, env=env, log=log), kill_after=kill_after, timeout=timeout)


def cli(*args) -> int:
    """``museum ARGS`` as the console script runs it; returns the exit code."""
    from museum.cli import main

    sys.argv = ["museum", *map(str, args)]
    try:
        main()
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 0
    return 0


def cli_captured(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(*args)
    return code, out.getvalue(), err.getvalue()


def fork_cli(*args, log: Path | None = None, **kw) -> int:
    return fork(lambda: cli(*args), log=log, **kw)[0]


def error_lines(log: Path) -> list[str]:
    """The ``error:`` lines a command printed (and no traceback)."""
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tiny_base):
    """Import everything a command imports lazily once, so forked children start at once; one torch thread
    (the same as the children, so images compare bit for bit, and far faster on a busy 2-core machine)."""
    import torch

    import museum.cli  # noqa: F401
    from museum.base.loading import load_pipeline
    from museum.export import export_concepts  # noqa: F401

    import rich.console  # noqa: F401  (for `museum list`)
    import rich.table  # noqa: F401
    from museum.generation.sampling import generate_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generate_images(load_pipeline(tiny_base), ["a red star"], seeds=[0], steps=1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- museum state

def committed_files(folder: Path) -> dict[str, bytes]:
    """What the manifest commits: museum.json, every file of every listed concept, every state file."""
    folder = Path(folder)
    manifest = json.loads((folder / "museum.json").read_text())
    paths = ["museum.json"]
    for c in manifest["concepts"]:
        paths += [f"{c['folder']}/{f}" for f in c["files"]]
    paths += [r["file"] for r in manifest["state"].values()]
    return {p: (folder / p).read_bytes() for p in paths}


def manifest_names(folder: Path) -> list[str]:
    return [c["name"] for c in json.loads((Path(folder) / "museum.json").read_text())["concepts"]]


def leftovers(folder: Path) -> list[str]:
    """Garbage a finished writer must not leave: temp entries, unreferenced concept folders and state files, work."""
    folder = Path(folder)
    manifest = json.loads((folder / "museum.json").read_text())
    keep = {c["folder"] for c in manifest["concepts"]} | {r["file"] for r in manifest["state"].values()}
    out = [str(p.relative_to(folder)) for p in folder.rglob(".tmp-*")]
    out += [f"concepts/{p.name}" for p in (folder / "concepts").glob("*") if f"concepts/{p.name}" not in keep]
    out += [f"state/{p.name}" for p in (folder / "state").glob("*") if f"state/{p.name}" not in keep]
    out += [f"work/{p.name}" for p in (folder / "work").glob("*")]
    return out


def prompt_for(name: str) -> str:
    return f"a <{name}> on a sand background"


def check_museum(folder: Path, out: Path, cli_concept: str | None) -> dict:
    """In a child: `museum list`, `museum generate` (one concept), and every concept's image through the API."""

    def job():
        result = {}
        code, stdout, stderr = cli_captured("list", folder)
        result["list"] = {"code": code, "stdout": stdout, "stderr": stderr}
        if cli_concept is not None:
            code, stdout, stderr = cli_captured("generate", folder, prompt_for(cli_concept), "--n", 1, "--steps", 2,
                                                "--out", out / "cli.png")
            result["generate"] = {"code": code, "stderr": stderr}
        m = Museum.open(folder)
        names = [c.name for c in m.concepts]
        images = m.generate([prompt_for(n) for n in names], n=1, steps=2) if names else []
        np.savez(out / "images.npz", **{n: np.asarray(im) for n, im in zip(names, images)})
        (out / "check.json").write_text(json.dumps(result))

    out.mkdir(parents=True, exist_ok=True)
    for f in ("check.json", "images.npz", "cli.png"):
        (out / f).unlink(missing_ok=True)
    code, _ = fork(job, log=out / "check.log")
    assert code == 0, (out / "check.log").read_text()[-3000:]
    result = json.loads((out / "check.json").read_text())
    with np.load(out / "images.npz") as data:
        result["images"] = {k: data[k] for k in data.files}
    if cli_concept is not None:
        result["cli_image"] = np.asarray(Image.open(out / "cli.png").convert("RGB"))[::4, ::4]
    return result


def assert_works(folder: Path, out: Path, refs: dict[str, np.ndarray], names: list[str], rng: random.Random,
                 context: str) -> dict[str, np.ndarray]:
    """`museum list` and `museum generate` work, list exactly ``names``, and every concept in ``refs`` draws its
    reference image. Returns every concept's image."""
    cli_concept = rng.choice(names) if names else None
    r = check_museum(folder, out, cli_concept)
    assert r["list"]["code"] == 0, (context, r["list"])
    for n in names:
        assert n in r["list"]["stdout"], (context, n, r["list"]["stdout"])
    assert list(r["images"]) == names, (context, list(r["images"]), names)
    if cli_concept is not None:
        assert r["generate"]["code"] == 0, (context, r["generate"])
        assert np.array_equal(r["cli_image"], r["images"][cli_concept]), context
    for n, ref in refs.items():
        assert np.array_equal(r["images"][n], ref), f"{context}: concept {n} draws a different image than before"
    return r["images"]


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
    from safetensors.torch import load_file

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


def report(title: str, counts: dict) -> None:
    print(f"\n{title}: {json.dumps(counts, indent=1)}")


def test_a_child_killed_inside_a_progress_bar_does_not_block_the_parent(tmp_path):
    """The harness itself: a child SIGKILLed while it holds tqdm's write lock (as a random kill can land)
    leaves the parent's next progress bar free (``own_progress_bar_lock``)."""
    import threading

    from tqdm.auto import tqdm

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
    import subprocess

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
def test_kill_9_during_remove(two_concepts, concept_images, tmp_path, point):
    """`museum remove` killed before, at and after its commit: the concept is there or gone, never half."""
    m, images = two_concepts
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


# ----------------------------------------------------------------------------- concurrency

def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    start = time.time()
    while text not in (path.read_text() if path.is_file() else ""):
        assert time.time() - start < timeout, f"{text!r} never appeared in {path}"
        time.sleep(0.02)


def test_two_learners_one_fails_at_once_or_waits(tiny_base, concept_images, tmp_path):
    folder = tmp_path / "museum"
    Museum.init(folder, base=tiny_base)

    def learn(name, *extra, env=None):
        img = {"a": "sunburst", "b": "checker", "c": "neon"}[name]
        return ["learn", folder, name, "--images", concept_images[img][0], "--class-word", "thing",
                "--method", "c-lora", "--steps", 30, *extra]

    # the first learner holds the lock (it is training; SIGSTOPped there) when the others start
    trace_a, trace_c = tmp_path / "a.txt", tmp_path / "c.txt"
    a = spawn(lambda: cli(*learn("a")), env={"MUSEUM_FAULT_TRACE": str(trace_a)}, log=tmp_path / "a.log")
    wait_for(trace_a, "train.start")
    os.kill(a, signal.SIGSTOP)
    log = tmp_path / "b.log"
    code, seconds = fork(lambda: cli(*learn("b")), log=log)
    lines = error_lines(log)
    assert code == 2 and seconds < 10, (code, seconds)
    assert len(lines) == 1 and f"being written by another process (pid {a})" in lines[0] and "--wait" in lines[0]
    # a third one, with --wait, waits its turn: it starts training only after the first finished
    c = spawn(lambda: cli(*learn("c", "--wait")), env={"MUSEUM_FAULT_TRACE": str(trace_c)}, log=tmp_path / "c.log")
    time.sleep(2)
    assert not trace_c.exists()  # still waiting for the lock
    os.kill(a, signal.SIGCONT)
    assert wait(a)[0] == 0 and wait(c)[0] == 0, (tmp_path / "c.log").read_text()[-2000:]
    assert trace_a.stat().st_mtime <= trace_c.stat().st_mtime and "learn.done" in trace_a.read_text()
    assert manifest_names(folder) == ["a", "c"]
    assert leftovers(folder) == []


def test_readers_never_see_a_half_written_concept(tiny_base, concept_images, tmp_path):
    """A writer learns and removes concepts while readers load every concept (checksums, shapes) and draw it,
    over and over: every read sees a whole committed state, never an error."""
    folder = tmp_path / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("base0", concept_images["neon"][0], method="textual-inversion", style=True, **FAST)
    stop = tmp_path / "stop"
    plan = [("learn", "a", "sunburst", "c-lora"), ("learn", "b", "checker", "textual-inversion"),
            ("remove", "a"), ("learn", "c", "sunburst", "custom-diffusion"), ("remove", "b"),
            ("learn", "d", "checker", "c-lora"), ("remove", "c")]

    def writer():
        w = Museum.open(folder)
        for step in plan:
            if step[0] == "learn":
                kw = dict(num_class_images=2) if step[3] == "custom-diffusion" else {}
                w.learn(step[1], concept_images[step[2]][0], method=step[3], class_word="thing", steps=4,
                        progress=False, **kw)
            else:
                w.remove(step[1])
        stop.write_text("done")

    def reader(i):
        seen = []
        while not stop.exists():
            r = Museum.open(folder)
            names = [c.name for c in r.concepts]
            r.pipe  # loads and verifies every concept the manifest names
            names = [c.name for c in r.manifest.concepts]  # (re-read if a writer changed it meanwhile)
            r.generate([prompt_for(n) for n in names], n=1, steps=1)
            code, out, err = cli_captured("list", folder)
            assert code == 0 and "warning" not in err, err
            seen.append(names)
        (tmp_path / f"seen-{i}.json").write_text(json.dumps(seen))

    states = [["base0"]]
    for step in plan:
        states.append(states[-1] + [step[1]] if step[0] == "learn" else [n for n in states[-1] if n != step[1]])
    pids = [spawn(lambda i=i: reader(i), log=tmp_path / f"reader-{i}.log") for i in range(2)]
    code, _ = fork(writer, log=tmp_path / "writer.log", timeout=600)
    stop.write_text("done")
    assert code == 0, (tmp_path / "writer.log").read_text()[-3000:]
    for i, pid in enumerate(pids):
        assert wait(pid, timeout=600)[0] == 0, (tmp_path / f"reader-{i}.log").read_text()[-3000:]
    seen = [s for i in range(2) for s in json.loads((tmp_path / f"seen-{i}.json").read_text())]
    report("readers during writes", {"reads": len(seen), "distinct states seen": len({tuple(s) for s in seen})})
    assert len(seen) >= 4
    assert all(s in states for s in seen), [s for s in seen if s not in states]
    assert manifest_names(folder) == states[-1] and leftovers(folder) == []


# ----------------------------------------------------------------------------- numerical faults

@pytest.fixture(scope="module")
def one_concept_template(tiny_base, concept_images, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("template") / "museum"
    m = Museum.init(folder, base=tiny_base)
    m.learn("sunburst", concept_images["sunburst"][0], method="textual-inversion", class_word="circle", **FAST)
    return folder


@pytest.fixture()
def museum(one_concept_template, tmp_path):
    """A museum with one concept (a copy of a module-wide one: learning it for every test would be slow)."""
    shutil.copytree(one_concept_template, tmp_path / "museum")
    return Museum.open(tmp_path / "museum")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_loss_stops_training(museum, concept_images, monkeypatch, value):
    import museum.training.trainer as trainer

    real = trainer.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        import torch

        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # the starting model's loss, measured before the first step
            return loss
        calls["n"] += 1
        return loss * value if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "denoising_loss", poisoned)
    before = museum_snapshot(museum.folder)
    with pytest.raises(TrainingDivergedError, match=r"loss became (nan|inf) at step 5 .*nothing was saved.*Lower the"):
        museum.learn("checker", concept_images["checker"][0], method="c-lora", class_word="square", steps=8,
                     checkpoint_every=2, progress=False)
    assert museum_snapshot(museum.folder) == before  # no concept, and no checkpoint to resume a diverged run from
    assert not (museum.folder / "work" / "checker").exists()


@pytest.mark.parametrize("method, settings, message", [
    ("textual-inversion", dict(token_lr=1e3), "token embedding grew"),  # the loss stays finite: the size is caught
    ("c-lora", dict(lr=1e4, token_lr=1e-3), "trained tensor of shape"),
    ("custom-diffusion", dict(lr=1e3, token_lr=0.0, num_class_images=2), "trained tensor of shape"),
])
def test_diverging_learning_rate_is_caught(museum, concept_images, method, settings, message):
    before = museum_snapshot(museum.folder)
    with pytest.raises(TrainingDivergedError, match=f"training diverged at step .*{message}.*Lower the learning rate"):
        museum.learn("checker", concept_images["checker"][0], method=method, class_word="square", steps=20,
                     progress=False, **settings)
    after = {k: v for k, v in museum_snapshot(museum.folder).items() if not k.startswith("cache")}
    assert after == before
    m = Museum.open(museum.folder)
    assert [c.name for c in m.concepts] == ["sunburst"]
    m.learn("checker", concept_images["checker"][0], method=method, class_word="square", steps=4, progress=False,
            **{k: v for k, v in settings.items() if k == "num_class_images"})  # sane settings learn


def test_loss_that_rises_far_above_the_start_is_caught(museum, concept_images, monkeypatch):
    import torch

    import museum.training.trainer as trainer

    real = trainer.denoising_loss
    calls = {"n": 0}

    def rising(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        return real(*args, **kwargs) * (50.0 if calls["n"] > 10 else 1.0)

    monkeypatch.setattr(trainer, "denoising_loss", rising)
    before = museum_snapshot(museum.folder)
    with pytest.raises(TrainingDivergedError, match=r"step 11 .*denoising loss rose to .* from the starting model's"):
        museum.learn("checker", concept_images["checker"][0], method="textual-inversion", class_word="square",
                     steps=30, progress=False)
    assert museum_snapshot(museum.folder) == before


# ----------------------------------------------------------------------------- hostile input

def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_folder(tmp_path: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "00.png")
    for fname, data in (extra or {}).items():
        (folder / fname).write_bytes(data)
    return folder


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, "WEBP")
    return buf.getvalue()


@pytest.mark.parametrize("case, message", [
    ("truncated-jpeg", "not a readable image"),
    ("corrupt-webp", "not a readable image"),
    ("empty-file", "not a readable image"),
    ("bomb-81-megapixels", "too large"),       # above Museum's limit, below PIL's own warning
    ("bomb-400-megapixels", "not a readable image .*DecompressionBomb"),  # PIL refuses it outright
    ("symlink-loop", "link loop"),
    ("link-to-device", "not a regular file"),
    ("fifo", "not a regular file"),
])
def test_hostile_image_folders(museum, tmp_path, case, message):
    """Each: a clear error before anything is read into memory or written, and the museum unchanged."""
    if case == "truncated-jpeg":
        folder = image_folder(tmp_path, case, {"cut.jpg": jpeg_bytes()[:400]})
    elif case == "corrupt-webp":
        data = bytearray(webp_bytes())
        data[30:] = b"\xff" * (len(data) - 30)
        folder = image_folder(tmp_path, case, {"bad.webp": bytes(data)})
    elif case == "empty-file":
        folder = image_folder(tmp_path, case, {"zero.png": b""})
    elif case == "bomb-81-megapixels":
        folder = image_folder(tmp_path, case, {"bomb.png": png_header(9000, 9000)})
    elif case == "bomb-400-megapixels":
        folder = image_folder(tmp_path, case, {"bomb.png": png_header(20000, 20000)})
    elif case == "symlink-loop":
        folder = image_folder(tmp_path, case)
        os.symlink("b.png", folder / "a.png")
        os.symlink("a.png", folder / "b.png")
        os.symlink(".", folder / "sub")  # a looping folder link is skipped, not walked
    elif case == "link-to-device":
        folder = image_folder(tmp_path, case)
        os.symlink("/dev/zero", folder / "zero.png")
    else:
        folder = image_folder(tmp_path, case)
        os.mkfifo(folder / "pipe.png")
    before = museum_snapshot(museum.folder)
    with time_limit(60), pytest.raises(ImageFolderError, match=message):  # an opened FIFO or /dev/zero would hang
        museum.learn("newthing", folder, method="textual-inversion", class_word="circle", **FAST)
    assert museum_snapshot(museum.folder) == before


def test_hostile_image_folder_on_the_command_line(museum, tmp_path):
    folder = image_folder(tmp_path, "cut", {"cut.jpg": jpeg_bytes()[:400]})
    log = tmp_path / "log"
    before = museum_snapshot(museum.folder)
    assert fork_cli("learn", museum.folder, "newthing", "--images", folder, "--class-word", "circle", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "cut.jpg: not a readable image" in lines[0]
    assert museum_snapshot(museum.folder) == before


def edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / "museum.json").read_text())
    change(data)
    (folder / "museum.json").write_text(json.dumps(data))


def set_concept(**fields):
    def change(data):
        data["concepts"][0].update(fields)
    return change


@pytest.mark.parametrize("case, change, message", [
    ("invalid-json", None, "is not valid JSON"),
    ("future-schema", lambda d: d.update(schema=99), "schema version 99, newer than this museum's .*upgrade museum"),
    ("schema-string", lambda d: d.update(schema="1"), "invalid schema version '1'"),
    ("not-a-manifest", lambda d: d.update(format="zip"), "is not a museum manifest"),
    ("missing-field", lambda d: d.pop("base"), "missing field 'base'"),
    ("concepts-not-a-list", lambda d: d.update(concepts="x"), "wrong type"),
    ("folder-escapes", set_concept(folder="../../elsewhere"), "has folder '../../elsewhere'"),
    ("name-with-dots", set_concept(name="../x", token="<../x>"), "invalid concept name '../x'"),
    ("file-escapes", set_concept(files={"../../../etc/passwd": "0" * 64}), "lists file '../../../etc/passwd'"),
    ("pickle-file", set_concept(files={"tensors.pt": "0" * 64}), "lists file 'tensors.pt'.*only safetensors"),
    ("bad-checksum-field", set_concept(files={"tensors.safetensors": "abc"}), "no valid sha256"),
    ("duplicate-concept", lambda d: d["concepts"].append(dict(d["concepts"][0])), "listed twice"),
    ("state-escapes", lambda d: d.update(state={"finetune": {"file": "../x.safetensors", "sha256": "0" * 64}}),
     "state files are state/NAME.safetensors"),
    ("state-pickle", lambda d: d.update(state={"finetune": {"file": "state/x.pt", "sha256": "0" * 64}}),
     "state files are state/NAME.safetensors"),
])
def test_hand_edited_manifest(museum, tmp_path, case, change, message):
    """Every command refuses a manifest it cannot trust, with one clear line, and writes nothing."""
    folder = museum.folder
    if change is None:
        (folder / "museum.json").write_text((folder / "museum.json").read_text()[:-20] + "}}")
    else:
        edit_manifest(folder, change)
    before = museum_snapshot(folder)
    with pytest.raises(MuseumError, match=message):
        Museum.open(folder)
    commands = (["list", folder], ["generate", folder, "a <sunburst> circle", "--out", tmp_path / "x.png"],
                ["learn", folder, "checker", "--images", tmp_path, "--class-word", "square"])
    for args in [commands[sum(map(ord, case)) % 3]]:  # one command line per case (each a fork): time
        log = tmp_path / "log"
        assert fork_cli(*args, log=log) == 2
        lines = error_lines(log)
        assert len(lines) == 1 and "museum.json" in lines[0], lines
    assert museum_snapshot(folder) == before
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def two_concept_template(one_concept_template, concept_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("template2") / "museum"
    shutil.copytree(one_concept_template, folder)
    Museum.open(folder).learn("checker", concept_images["checker"][0], method="c-lora", class_word="square", **FAST)
    m = Museum.open(folder)
    return folder, {n: np.asarray(m.generate(prompt_for(n), n=1, steps=2)[0]) for n in ("sunburst", "checker")}


@pytest.fixture()
def two_concepts(two_concept_template, tmp_path):
    """A museum with a textual-inversion and a C-LoRA concept, and the image each draws."""
    folder, images = two_concept_template
    shutil.copytree(folder, tmp_path / "museum")
    return Museum.open(tmp_path / "museum"), images


def rewrite_tensors(folder: Path, name: str, change) -> None:
    """Replace a concept's tensors and record the new checksum, as a careful forger would."""
    from safetensors.torch import load_file, save_file

    from museum.store.manifest import sha256_file

    entry = next(c for c in json.loads((folder / "museum.json").read_text())["concepts"] if c["name"] == name)
    path = folder / entry["folder"] / "tensors.safetensors"
    tensors = load_file(path)
    new = change(tensors)
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        save_file(new, path)
    edit_manifest(folder, lambda d: next(c for c in d["concepts"] if c["name"] == name)["files"].update(
        {"tensors.safetensors": sha256_file(path)}))


def _wrong_lora(tensors):
    key = next(k for k in tensors if k.endswith(".lora_A"))
    return {**tensors, key: torch_zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)}


def _wrong_rank(tensors):
    key = next(k for k in tensors if k.endswith(".lora_B"))
    return {**tensors, key: torch_zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def _wrong_token(tensors):
    return {**tensors, "<checker>": torch_zeros(1, 24)}


def _foreign_layer(tensors):
    return {**tensors, "mid_block.attentions.7.transformer_blocks.0.attn2.to_k.lora_A": torch_zeros(4, 16)}


def _nan(tensors):
    key = next(k for k in tensors if k.endswith(".lora_B"))
    bad = tensors[key].clone()
    bad[0, 0] = float("nan")
    return {**tensors, key: bad}


def torch_zeros(*shape):
    import torch

    return torch.zeros(*shape)


@pytest.mark.parametrize("case, change, message", [
    ("lora-width", _wrong_lora, r"lora_A has shape \(\d+, 19\), but this base model needs \(rank, 16\)"),
    ("lora-rank", _wrong_rank, "to match its lora_A"),
    ("token-width", _wrong_token, r"token embedding has shape \(1, 24\).*needs \(1, 16\)"),
    ("foreign-layer", _foreign_layer, "names a layer this base model does not have"),
    ("nan-values", _nan, "NaN/Inf values"),
    ("not-safetensors", lambda t: b"\x80\x04K\x01." * 10, "not a valid safetensors file"),
])
def test_concept_tensors_that_do_not_fit_the_base_model(two_concepts, tmp_path, case, change, message):
    m, _ = two_concepts
    rewrite_tensors(m.folder, "checker", change)
    before = museum_snapshot(m.folder)
    with pytest.raises(MuseumError, match=message):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a <checker>", "--out", tmp_path / "x.png", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("error: concept 'checker'") and "museum remove" in lines[0]
    assert museum_snapshot(m.folder) == before


@pytest.mark.parametrize("case", ["missing", "tampered", "missing-concept-json", "corrupt-concept-json"])
def test_damaged_concept_is_named_and_can_be_removed(two_concepts, concept_images, tmp_path, case):
    m, images = two_concepts
    concept_dir = m.concept("checker").path
    if case == "missing":
        (concept_dir / "tensors.safetensors").unlink()
    elif case == "tampered":
        data = bytearray((concept_dir / "tensors.safetensors").read_bytes())
        data[-1] ^= 0x01  # one bit of one weight
        (concept_dir / "tensors.safetensors").write_bytes(bytes(data))
    elif case == "missing-concept-json":
        (concept_dir / "concept.json").unlink()
    else:
        (concept_dir / "concept.json").write_text("{ not json")
    message = "is missing" if case.startswith("missing") else "does not match its checksum"
    before = museum_snapshot(m.folder)
    with pytest.raises(MuseumError, match=f"concept 'checker': file .* {message}.*museum remove"):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    with pytest.raises(MuseumError, match=message):  # learning refuses too: it would build on a damaged museum
        Museum.open(m.folder).learn("neon", concept_images["neon"][0], method="textual-inversion", style=True, **FAST)
    assert museum_snapshot(m.folder) == before

    def listing():
        code, out, err = cli_captured("list", m.folder)
        (tmp_path / "list.json").write_text(json.dumps([code, out, err]))

    assert fork(listing)[0] == 0
    code, out, err = json.loads((tmp_path / "list.json").read_text())
    assert code == 0 and "checker" in out and "sunburst" in out  # listing still works, and names the damage
    assert "warning: concept 'checker'" in err and message in err
    assert fork_cli("remove", m.folder, "checker") == 0
    again = Museum.open(m.folder)
    assert np.array_equal(np.asarray(again.generate(prompt_for("sunburst"), n=1, steps=2)[0]), images["sunburst"])


def test_unknown_method_on_the_command_line(museum, concept_images, tmp_path):
    log = tmp_path / "log"
    assert fork_cli("learn", museum.folder, "checker", "--images", concept_images["checker"][0], "--class-word",
                    "square", "--method", "dreambooth-xl", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "unknown method 'dreambooth-xl'; available methods: c-lora" in lines[0]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs", "a\\b", "Ünïcode"])
def test_concept_names_cannot_escape(museum, concept_images, tmp_path, name):
    before = museum_snapshot(museum.folder)
    log = tmp_path / "log"
    assert fork_cli("learn", museum.folder, name, "--images", concept_images["checker"][0], "--class-word",
                    "square", "--steps", 2, log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "error: invalid concept name" in lines[0]
    assert museum_snapshot(museum.folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "museum"]  # nothing written beside the museum
    assert fork_cli("remove", museum.folder, name, log=log) == 2


def test_prompt_longer_than_the_tokenizer_limit(two_concepts, tmp_path):
    m, _ = two_concepts
    limit = m.pipe.tokenizer.model_max_length
    long_prompt = "a <sunburst> circle on a sand background, " + "large red star, " * 60 + "<checker>"
    with pytest.warns(UserWarning, match=fr"more than the model's {limit}; it is truncated.*<checker> fall\(s\) after"):
        long_images = m.generate(long_prompt, n=1, steps=2)
    with warnings.catch_warnings(record=True) as caught:  # a prompt within the limit draws without a warning
        warnings.simplefilter("always")
        m.generate(prompt_for("sunburst"), n=1, steps=2)
    assert not [w for w in caught if "truncated" in str(w.message)]
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, long_prompt, "--n", 1, "--steps", 2, "--out", tmp_path / "x.png",
                    log=log) == 0
    text = log.read_text()
    warning_lines = [ln for ln in text.splitlines() if ln.startswith("warning: prompt has")]
    assert len(warning_lines) == 1 and "truncated" in warning_lines[0] and "Traceback" not in text
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))[::4, ::4],
                          np.asarray(long_images[0]))


def test_museum_for_another_base_model(two_concepts, concept_images, tmp_path):
    m, images = two_concepts
    manifest = (m.folder / "museum.json").read_text()
    before = museum_snapshot(m.folder)
    # the base model moved away
    edit_manifest(m.folder, lambda d: d["base"].update(path=str(tmp_path / "gone")))
    with pytest.raises(MuseumError, match="base model is unavailable: .*if it moved, set base.path in"):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)
    # another model at the recorded path (different weights, same architecture)
    other = tmp_path / "other"
    from museum.base.tiny import build_tiny_pipeline

    build_tiny_pipeline(other, seed=1)
    edit_manifest(m.folder, lambda d: d["base"].update(path=str(other)))
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a <sunburst> circle", "--out", tmp_path / "x.png", log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and "was made for base model" in lines[0] and "cannot load on another base model" in lines[0]
    with pytest.raises(MuseumError, match="made for base model"):
        Museum.open(m.folder).learn("neon", concept_images["neon"][0], method="textual-inversion", style=True, **FAST)
    (m.folder / "museum.json").write_text(manifest)
    assert museum_snapshot(m.folder) == before
    again = Museum.open(m.folder)
    assert np.array_equal(np.asarray(again.generate(prompt_for("checker"), n=1, steps=2)[0]), images["checker"])


# ----------------------------------------------------------------------------- loading never runs code

EVIL = """
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {sentinel}",))
"""


def pickle_base(tiny_base: Path, tmp_path: Path, *, evil: bool) -> Path:
    """A copy of the tiny pipeline whose UNet weights are a pickle file (.bin) instead of safetensors."""
    import pickle

    import torch
    from diffusers import UNet2DConditionModel

    base = tmp_path / ("evil-base" if evil else "bin-base")
    shutil.copytree(tiny_base, base)
    unet_dir = base / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    if evil:
        namespace = {}
        exec(EVIL.format(sentinel=tmp_path / "PWNED"), namespace)
        (unet_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(namespace["Payload"]()))
    else:
        unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
        torch.save(unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    return base


def test_pickle_weights_are_refused(tiny_base, tmp_path):
    evil = pickle_base(tiny_base, tmp_path, evil=True)
    with pytest.raises(BaseModelError, match=r"unet has weights only in a pickle format .*--allow-pickle"):
        Museum.init(tmp_path / "m1", base=evil)
    assert not (tmp_path / "m1").exists()
    log = tmp_path / "log"
    assert fork_cli("init", tmp_path / "m2", "--base", evil, log=log) == 2
    lines = error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("error: base model") and "--allow-pickle" in lines[0]
    assert fork_cli("generate", "a red star", "--base", evil, "--out", tmp_path / "x.png", log=log) == 2
    # a museum whose base model was swapped for pickle weights after it was made
    from museum.base.loading import base_hash

    museum = tmp_path / "m3"
    Museum.init(museum, base=tiny_base)
    edit_manifest(museum, lambda d: d["base"].update(path=str(evil), hash=base_hash(evil)))  # hashing reads bytes
    with pytest.raises(BaseModelError, match="pickle format"):
        Museum.open(museum).generate("a red star", n=1, steps=1)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


def test_pickle_weights_load_with_the_explicit_flag(tiny_base, tmp_path):
    base = pickle_base(tiny_base, tmp_path, evil=False)
    m = Museum.init(tmp_path / "m", base=base, allow_pickle=True)
    with pytest.raises(BaseModelError, match="pickle"):
        Museum.open(m.folder).generate("a red star", n=1, steps=1)
    image = Museum.open(m.folder, allow_pickle=True).generate("a red star", n=1, steps=1)[0]
    reference = Museum.init(tmp_path / "ref", base=tiny_base).generate("a red star", n=1, steps=1)[0]
    assert np.array_equal(np.asarray(image), np.asarray(reference))  # the same weights, read from the pickle
    log = tmp_path / "log"
    assert fork_cli("generate", m.folder, "a red star", "--n", 1, "--steps", 1, "--allow-pickle", "--out",
                    tmp_path / "x.png", log=log) == 0, log.read_text()


@pytest.mark.parametrize("case", ["python-file", "foreign-library"])
def test_code_in_a_base_model_is_refused_even_with_the_flag(tiny_base, tmp_path, case):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    if case == "python-file":
        (base / "unet" / "modeling.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
        message = "contains Python code"
    else:
        index = json.loads((base / "model_index.json").read_text())
        index["unet"] = ["evil_models", "UNet"]
        (base / "model_index.json").write_text(json.dumps(index))
        message = "comes from 'evil_models'"
    for allow in (False, True):
        with pytest.raises(BaseModelError, match=message):
            Museum.init(tmp_path / f"m-{allow}", base=base, allow_pickle=allow)
    assert not (tmp_path / "PWNED").exists()


def test_resume_refuses_a_checkpoint_of_another_run(museum, concept_images, monkeypatch):
    """--resume continues only the run that made the checkpoint (same settings, images, earlier concepts)."""
    import museum.museum as museum_module

    original = museum_module.train_concept

    def interrupted(*args, **kwargs):
        def stop(step, loss):
            if step == 5:
                raise KeyboardInterrupt

        return original(*args, on_step=stop, **kwargs)

    kw = dict(method="c-lora", class_word="square", progress=False, checkpoint_every=2)
    monkeypatch.setattr(museum_module, "train_concept", interrupted)
    with pytest.raises(KeyboardInterrupt):
        museum.learn("checker", concept_images["checker"][0], steps=8, **kw)
    monkeypatch.setattr(museum_module, "train_concept", original)
    m = Museum.open(museum.folder)
    with pytest.raises(MuseumError, match="cannot resume: the checkpoint .* different config"):
        m.learn("checker", concept_images["checker"][0], steps=10, resume=True, **kw)
    with pytest.raises(MuseumError, match="different images"):
        m.learn("checker", concept_images["neon"][0], steps=8, resume=True, **kw)
    assert (museum.folder / "work" / "checker" / "checkpoint-4").is_dir()  # refusing kept it
    with pytest.warns(UserWarning, match="discarding the checkpoints"):
        m.learn("checker", concept_images["neon"][0], steps=8, **kw)  # without --resume: start over
    assert [c.name for c in Museum.open(museum.folder).concepts] == ["sunburst", "checker"]
    assert not (museum.folder / "work").exists() or not any((museum.folder / "work").iterdir())
