"""Concept tokens: adding a new word to the tokenizer and a row to the text encoder's embedding table.

Shared by every method: textual inversion trains only this row (Gal et al. 2022, eq. 2);
Custom Diffusion's modifier token V*, C-LoRA's random token and Perfusion's concept word are
the same mechanism with another initialisation. Tokens are stored in diffusers' textual
inversion layout (``{token: (1, D)}``) so ``pipe.load_textual_inversion`` reads them.

An SDXL base has two tokenizers and text encoders: the token is added to both, with one
embedding per encoder (stored as ``token`` and ``token + SECOND``; exported as diffusers' SDXL
``{"clip_l": ..., "clip_g": ...}``). Functions take ``which`` (0 or 1) to name the encoder.
"""

from __future__ import annotations

import torch

from museum.errors import TokenError

SECOND = "_2"  # key suffix of a token's second-encoder embedding (SDXL)


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` has a second text encoder (SDXL)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_pairs(pipe) -> list:
    """(tokenizer, text encoder) of every text encoder of ``pipe``: one, or two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def word_vector(pipe, word: str, which: int = 0) -> torch.Tensor:
    """Mean input embedding of the sub-tokens of ``word`` (a class word is usually one token)."""
    tokenizer, encoder = text_pairs(pipe)[which]
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise TokenError(f"the word {word!r} has no tokens")
    table = encoder.get_input_embeddings().weight
    return table[ids].detach().float().mean(0)


def add_token(pipe, token: str, vector: torch.Tensor, vector_2: torch.Tensor | None = None) -> int:
    """Add ``token`` with embedding ``vector`` (and ``vector_2`` in an SDXL base's second encoder); return its
    id in the first tokenizer. Refuses tokens the vocabulary has."""
    pairs = text_pairs(pipe)
    if any(token in tokenizer.get_vocab() for tokenizer, _ in pairs):
        raise TokenError(f"the token {token!r} is already in the vocabulary; choose another concept name")
    if len(pairs) == 2 and vector_2 is None:
        raise TokenError(f"this base has two text encoders (SDXL): {token} needs an embedding for each")
    ids = []
    for (tokenizer, encoder), v in zip(pairs, (vector, vector_2)):
        if token not in tokenizer.get_vocab():  # an SDXL pipeline may share one tokenizer object
            tokenizer.add_tokens([token])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id] = v.to(encoder.dtype)
        ids.append(token_id)
    return ids[0]


def token_ids(pipe, token: str) -> list[int]:
    """The token's id in each tokenizer."""
    return [tokenizer.convert_tokens_to_ids(token) for tokenizer, _ in text_pairs(pipe)]


def initial_vector(pipe, mode: str, class_word: str, generator: torch.Generator, which: int = 0) -> torch.Tensor:
    """A token's starting embedding: from the class word ("class") or random at the table's scale ("random")."""
    if mode == "class":
        return word_vector(pipe, class_word if class_word != "style" else "style", which)
    if mode == "random":
        table = text_pairs(pipe)[which][1].get_input_embeddings().weight.detach().float()
        return torch.randn(table.shape[1], generator=generator) * table.std() + table.mean(0)
    raise ValueError(f"token_init must be 'class' or 'random', not {mode!r}")


def token_vector(pipe, token: str, which: int = 0) -> torch.Tensor:
    tokenizer, encoder = text_pairs(pipe)[which]
    token_id = tokenizer.convert_tokens_to_ids(token)
    return encoder.get_input_embeddings().weight[token_id].detach().clone().float()


def token_tensors(pipe, token: str) -> dict[str, torch.Tensor]:
    """What a concept stores for its token: ``{token: (1, D)}`` (and ``{token_2: (1, D2)}`` on SDXL)."""
    out = {token: token_vector(pipe, token)[None]}
    if is_sdxl(pipe):
        out[token + SECOND] = token_vector(pipe, token, 1)[None]
    return out


def install_token(pipe, token: str, tensors: dict[str, torch.Tensor]) -> int:
    """Add a stored concept's token (see :func:`token_tensors`) to ``pipe``."""
    second = tensors[token + SECOND][0] if is_sdxl(pipe) and token + SECOND in tensors else None
    return add_token(pipe, token, tensors[token][0], second)


def train_only_rows(embedding: torch.nn.Embedding, row_ids: list[int]):
    """Make ``embedding.weight`` trainable with gradients masked to ``row_ids``; returns the hook handle."""
    mask = torch.zeros(embedding.weight.shape[0], 1, dtype=embedding.weight.dtype, device=embedding.weight.device)
    mask[row_ids] = 1.0
    embedding.weight.requires_grad_(True)
    return embedding.weight.register_hook(lambda grad: grad * mask)
