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
    # training images (3 concepts x 5), samples (3), each alone (3 x 4), composed (2 x 4)
    assert len(re.findall(r"<img src=\"data:image/png;base64,", html)) == 15 + 3 + 12 + 8
    assert "&lt;neon&gt; style" in html  # composed prompts are captioned (escaped)
    assert any("demo finished" in line for line in lines)
    # a second run reuses what is learned
    lines.clear()
    run_demo(tmp_path / "demo", steps=2, base=tiny_base, echo=lines.append, progress=False)
    assert sum("already learned" in line for line in lines) == 3
