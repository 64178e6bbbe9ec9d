"""`museum demo` end to end on a tiny pipeline: three concepts, a gallery page a person can open."""

import re

from museum.demo import DEMO_CONCEPTS, run_demo
from museum.museum import Museum


def test_demo_learns_three_concepts_and_writes_a_gallery(tiny_base, tmp_path):
    lines = []
    page = run_demo(tmp_path / "demo", steps=2, base=tiny_base, echo=lines.append, progress=False)
    m = Museum.open(tmp_path / "demo" / "museum")
    assert [c.name for c in m.concepts] == list(DEMO_CONCEPTS)
    html = page.read_text()
    for name in DEMO_CONCEPTS:
        assert f"id='concept-{name}'" in html
    # training images (3 concepts x 5), samples (3), each alone (3 x 4), in two new scenes (3 x 2 x 2)
    assert len(re.findall(r"<img src=\"data:image/png;base64,", html)) == 15 + 3 + 12 + 12
    # prompts are captioned (escaped), the learned phrase inside the world's words
    assert re.search(r"a small &lt;gem&gt;[a-z ]* at the top on a night background", html)
    assert any("demo finished" in line for line in lines)
    # a second run reuses what is learned
    lines.clear()
    run_demo(tmp_path / "demo", steps=2, base=tiny_base, echo=lines.append, progress=False)
    assert sum("already learned" in line for line in lines) == 3
