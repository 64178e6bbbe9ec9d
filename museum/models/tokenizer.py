"""A CLIP tokenizer whose BPE vocabulary holds every word of the rendered world as one token.

The merges are learned with the ``tokenizers`` BPE trainer on the word list itself, so
encoding a known word reproduces it whole; every printable ASCII character (with and
without CLIP's ``</w>`` end-of-word suffix) stays in the vocabulary so any other word
still tokenizes, character by character. The files are the ones ``CLIPTokenizer``
reads (``vocab.json`` + ``merges.txt``, loaded with ``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``:
transformers 5's constructor takes ``vocab=``/``merges=`` and silently ignores ``vocab_file=``/``merges_file=``, and
without ``model_max_length`` the pipeline overflows).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32  # captions of the world are at most ~16 tokens


def write_clip_tokenizer(words: list[str], directory: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Write a CLIP tokenizer covering ``words`` to ``directory`` and load it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = [c for c in string.printable if not c.isspace()]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(sorted(set(words)))] * 4, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    # ids in a fixed order: the trainer breaks ties between equally frequent merges differently in every
    # process, so its own ids (and any model initialised on them) would change from run to run
    for token in alphabet + [c + "</w>" for c in alphabet] + sorted(learned["vocab"], key=lambda t: (len(t), t)):
        vocab.setdefault(token, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    for token in (BOS, EOS):
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=model_max_length)
    unsplit = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if unsplit:
        raise RuntimeError(f"tokenizer splits world words {unsplit[:5]}; the BPE merges are inconsistent")
    return tokenizer
