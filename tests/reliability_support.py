"""What the reliability tests (issue 9: nothing lost under crashes, concurrent use and hostile input) share.

Commands run in real child processes: ``os.fork`` of the test process, which has already imported torch and
diffusers (``warm_imports``), so a child starts in milliseconds instead of the 15 s a fresh ``python -m museum``
takes here (``warm_imports`` in conftest). Also: what a museum on disk commits and leaves behind, and a check that
a museum still lists and draws what it did. docs/RELIABILITY.md lists every fault, its test and the result.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import std

from museum.cli import main
from museum.museum import Museum

FAST = dict(steps=2, progress=False)


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


def report(title: str, counts: dict) -> None:
    print(f"\n{title}: {json.dumps(counts, indent=1)}")
