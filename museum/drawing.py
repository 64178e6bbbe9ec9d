"""Drawing with a museum's concepts (``Museum.generate``, and the sample a new concept is committed with): which
concepts a prompt names (by token), each of their methods' effect installed on the pipeline
(``Method.activate``, undone after), and seeded samples, one group of prompts naming the same concepts at a time."""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from PIL import Image

from museum.errors import MuseumError, MuseumUserError
from museum.generation.sampling import generate_images, warn_if_truncated
from museum.methods.base import get_method
from museum.plumbing import kv
from museum.store.manifest import ConceptEntry

TOKEN_RE = re.compile(r"<[^<>\s]+>")


class Drawing:
    """Drawing with the concepts ``entries`` (default: the museum's; a commit passes them with the concept it is
    about to add) of ``museum`` (a ``museum.museum.Museum``: its pipeline, concepts and method states)."""

    def __init__(self, museum, entries: Sequence[ConceptEntry] | None = None):
        self.museum = museum
        self._entries = None if entries is None else list(entries)

    @property
    def entries(self) -> list[ConceptEntry]:
        """The concepts drawn with (the museum's as of now, unless given: loading may read a newer manifest)."""
        return self.museum.manifest.concepts if self._entries is None else self._entries

    def parse_prompt(self, prompt: str) -> list[ConceptEntry]:
        """The concepts a prompt names, by token. Unknown ``<tokens>`` are an error listing the museum's concepts."""
        if not prompt or not prompt.strip():
            raise MuseumError("the prompt is empty; describe the image, e.g. \"a <name> on a sand background\"")
        by_token = {c.token: c for c in self.entries}
        found = []
        for tok in TOKEN_RE.findall(prompt):
            if tok not in by_token:
                raise MuseumError(f"the prompt names {tok}, which this museum does not have; its concepts: "
                                  f"{', '.join(by_token) or '(none)'}")
            if by_token[tok] not in found:
                found.append(by_token[tok])
        return found

    def _involved_methods(self, active: list[ConceptEntry]):
        """For each method named by ``active``: (method, all its concepts, the active ones, its state)."""
        for method_name in dict.fromkeys(e.method for e in active):
            mine = [e for e in self.entries if e.method == method_name]
            infos = [self.museum.concept_info(e) for e in mine]
            act = [i for i, e in zip(infos, mine) if e in active]
            yield get_method(method_name), infos, act, self.museum.method_state(method_name)

    def deltas_for(self, active: list[ConceptEntry]) -> dict[str, torch.Tensor]:
        """The K/V weight deltas every method contributes for a prompt naming ``active``."""
        return kv.sum_deltas(*[m.kv_deltas(infos, act, state, self.museum.pipe)
                               for m, infos, act, state in self._involved_methods(active)])

    @contextmanager
    def activated(self, active: list[ConceptEntry]) -> Iterator[None]:
        """The pipeline with every method's effect for a prompt naming ``active`` installed (and removed after)."""
        with ExitStack() as stack:
            try:
                for m, infos, act, state in self._involved_methods(active):
                    stack.enter_context(m.activate(self.museum.pipe, infos, act, state))
            except MuseumUserError:
                raise
            except (ValueError, RuntimeError, KeyError, IndexError) as err:
                names = ", ".join(e.name for e in active)
                raise MuseumError(f"concept(s) {names} could not be applied to the base model ({err}); their tensors "
                                  "do not fit it: restore them from a backup, or `museum remove` them") from None
            yield

    def images(self, prompts: list[str], seeds: list[int], *, steps: int = 25,
               guidance: float = 7.5) -> list[Image.Image]:
        """Image i of ``prompts[i]`` drawn from ``seeds[i]``, with the concepts the prompt names active."""
        pipe = self.museum.pipe
        warn_if_truncated(pipe.tokenizer, prompts, [c.token for c in self.entries])
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(e.name for e in self.parse_prompt(p)), []).append(i)
        by_name = {e.name: e for e in self.entries}
        images: list[Image.Image | None] = [None] * len(prompts)
        for names, idx in groups.items():
            with self.activated([by_name[nm] for nm in names]):
                out = generate_images(pipe, [prompts[i] for i in idx], seeds=[seeds[i] for i in idx],
                                      steps=steps, guidance=guidance)
            for i, im in zip(idx, out):
                images[i] = im
        return images
