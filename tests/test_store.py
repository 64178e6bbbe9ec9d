"""The museum on disk: bad input never changes it, one writer at a time, base-model checks."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import interrupted_learning, museum_snapshot, run_cli
from museum.errors import ImageFolderError, MuseumError, MuseumLockedError, TrainingDivergedError
from museum.models.loading import load_pipeline
from museum.museum import Museum
from museum.store.lock import writer_lock
from museum.training.data import read_image_folder

FAST = dict(steps=2, progress=False)


def write_folder(path, images=(), files=()):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(path / f"{i:02d}.png")
    for name, data in files:
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "has no images"),
    ("text-file", "not an image file"),
    ("corrupt", "not a readable image"),
    ("truncated", "not a readable image"),
    ("tiny", "too small"),
])
def test_bad_image_folders_leave_museum_unchanged(one_concept_museum, tmp_path, case, message):
    good = Image.new("RGB", (32, 32), "red")
    png = (tmp_path / "ok.png")
    good.save(png)
    folder = tmp_path / case
    if case == "empty":
        write_folder(folder)
    elif case == "text-file":
        write_folder(folder, [good], [("notes.txt", b"hello")])
    elif case == "corrupt":
        write_folder(folder, [good], [("bad.png", b"\x89PNG\r\n\x1a\n not really")])
    elif case == "truncated":
        write_folder(folder, [good], [("cut.png", png.read_bytes()[:60])])
    elif case == "tiny":
        write_folder(folder, [Image.new("RGB", (1, 1))])
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(ImageFolderError, match=message):
        one_concept_museum.learn("newthing", folder, method="textual-inversion", class_word="circle", **FAST)
    assert museum_snapshot(one_concept_museum.folder) == before


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA"])
def test_odd_image_modes_are_converted(tmp_path, mode):
    if mode == "I;16":
        arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
        image = Image.fromarray(arr)
        assert image.mode == "I;16"
    else:
        image = Image.new("RGB", (32, 32), (200, 30, 30)).convert(mode)
    write_folder(tmp_path / "f", [image])
    images, hashes = read_image_folder(tmp_path / "f")
    assert images[0].mode == "RGB" and images[0].size == (32, 32) and len(hashes[0]) == 64
    if mode == "I;16":  # 16-bit range is rescaled, not clipped to white
        values = np.asarray(images[0])[..., 0]
        assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 100


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    write_folder(tmp_path / "f", [image])
    images, _ = read_image_folder(tmp_path / "f")
    assert np.asarray(images[0])[0, 0].tolist() == [255, 255, 255]


def test_duplicate_name_and_bad_names(one_concept_museum, concept_images):
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(MuseumError, match="already has a concept 'sunburst'"):
        one_concept_museum.learn("sunburst", concept_images["checker"][0], method="textual-inversion",
                                 class_word="square", **FAST)
    for bad in ("../evil", "a/b", "", "UPPER", "x" * 41):
        with pytest.raises(MuseumError, match="invalid concept name"):
            one_concept_museum.learn(bad, concept_images["checker"][0], method="textual-inversion",
                                     class_word="square", **FAST)
    assert museum_snapshot(one_concept_museum.folder) == before


def test_token_already_in_vocabulary(tiny_base, concept_images, tmp_path):
    pipe = load_pipeline(tiny_base)
    pipe.tokenizer.add_tokens(["<taken>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    pipe.save_pretrained(tmp_path / "base")
    m = Museum.init(tmp_path / "museum", base=tmp_path / "base")
    before = museum_snapshot(m.folder)
    with pytest.raises(MuseumError, match="already in the base model's vocabulary"):
        m.learn("taken", concept_images["checker"][0], method="textual-inversion", class_word="square", **FAST)
    assert museum_snapshot(m.folder) == before
    m.learn("free", concept_images["checker"][0], method="textual-inversion", class_word="square", **FAST)


def test_missing_class_word_and_unknown_method(one_concept_museum, concept_images):
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(MuseumError, match="--class-word"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method="textual-inversion", **FAST)
    with pytest.raises(ValueError, match="available methods"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method="dreambooth-xl",
                                 class_word="square", **FAST)
    assert museum_snapshot(one_concept_museum.folder) == before


def test_second_writer_fails_at_once(one_concept_museum, concept_images):
    folder, images = one_concept_museum.folder, concept_images["checker"][0]
    before = museum_snapshot(folder)
    with writer_lock(folder):
        with pytest.raises(MuseumLockedError, match="another process"):
            Museum.open(folder).learn("checker", images, method="textual-inversion", class_word="square", **FAST)
        result = run_cli("learn", str(folder), "checker", "--images", str(images), "--class-word", "square",
                         "--method", "textual-inversion", "--steps", "2")
        assert result.returncode == 2 and "another process" in result.stderr and "--wait" in result.stderr
    assert museum_snapshot(folder) == before


def test_concept_refuses_another_base_model(tiny_base, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    m = Museum.init(tmp_path / "m2", base=other)
    m.learn("sunburst", [Image.new("RGB", (32, 32), "orange")] * 3, method="textual-inversion", class_word="circle",
            **FAST)
    cfg = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    cfg["beta_end"] = 0.02  # the base model changes under the museum
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MuseumError, match=r"made for base model .*other-base.*hash"):
        Museum.open(m.folder).generate("a <sunburst> circle", n=1, steps=2)


def test_manifest_is_the_commit_point(one_concept_museum, concept_images):
    """A concept folder the manifest does not name (a crash before the commit) is invisible and cleaned up."""
    stray = one_concept_museum.folder / "concepts" / "001-ghost"
    stray.mkdir()
    (stray / "tensors.safetensors").write_bytes(b"garbage")
    assert [c.name for c in Museum.open(one_concept_museum.folder).concepts] == ["sunburst"]
    one_concept_museum.learn("checker", concept_images["checker"][0], method="textual-inversion",
                             class_word="square", **FAST)
    assert not stray.exists()
    assert [c.name for c in Museum.open(one_concept_museum.folder).concepts] == ["sunburst", "checker"]


def test_cli_list_and_learn(tiny_base, concept_images, tmp_path):
    folder = tmp_path / "cli-museum"
    assert run_cli("init", str(folder), "--base", str(tiny_base)).returncode == 0
    r = run_cli("learn", str(folder), "checker", "--images", str(concept_images["checker"][0]), "--class-word",
                "square", "--method", "textual-inversion", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "<checker> square" in r.stdout
    listing = run_cli("list", str(folder))
    assert listing.returncode == 0 and "checker" in listing.stdout and "textual-inversion" in listing.stdout
    r = run_cli("generate", str(folder), "a <mug> on a table", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "<checker>" in r.stderr


def test_diverging_training_stops_cleanly(one_concept_museum, concept_images):
    before = museum_snapshot(one_concept_museum.folder)
    with pytest.raises(TrainingDivergedError, match="Lower the learning rate"):
        one_concept_museum.learn("checker", concept_images["checker"][0], method="c-lora", class_word="square",
                                 steps=30, lr=1e12, token_lr=1e12, progress=False)
    assert museum_snapshot(one_concept_museum.folder) == before
    assert [c.name for c in Museum.open(one_concept_museum.folder).concepts] == ["sunburst"]


def test_resume_continues_an_interrupted_concept(tiny_base, concept_images, tmp_path):
    """Interrupt learning after a checkpoint; --resume finishes it and gives the uninterrupted result."""
    kw = dict(method="c-lora", class_word="circle", steps=8, lr=1e-2, progress=False, checkpoint_every=4)
    straight = Museum.init(tmp_path / "straight", base=tiny_base)
    straight.learn("sunburst", concept_images["sunburst"][0], **kw)

    m = Museum.init(tmp_path / "resumed", base=tiny_base)
    with interrupted_learning(6), pytest.raises(KeyboardInterrupt):
        m.learn("sunburst", concept_images["sunburst"][0], **kw)
    assert Museum.open(m.folder).concepts == []
    assert (m.folder / "work" / "sunburst" / "checkpoint-4").is_dir()
    m = Museum.open(m.folder)
    m.learn("sunburst", concept_images["sunburst"][0], resume=True, **kw)
    a = load_file(straight.concept("sunburst").path / "tensors.safetensors")
    b = load_file(m.concept("sunburst").path / "tensors.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert not (m.folder / "work" / "sunburst").exists()
