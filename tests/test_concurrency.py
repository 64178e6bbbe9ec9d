"""Concurrent use (issue 9): two writers (one fails at once or waits for the lock), and readers that never see a
half-written concept while a writer commits, each command in a forked child process (``reliability_support``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from museum.museum import Museum
from reliability_support import (
    FAST, cli, cli_captured, error_lines, fork, leftovers, manifest_names, prompt_for, report, spawn, wait,
)

pytestmark = pytest.mark.usefixtures("warm_imports")  # forked children start at once

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
