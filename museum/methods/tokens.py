"""Concept tokens: adding a new word to the tokenizer and a row to the text encoder's embedding table.

Shared by every method: textual inversion trains only this row (Gal et al. 2022, eq. 2);
Custom Diffusion's modifier token V*, C-LoRA's random token and Perfusion's concept word are
the same mechanism with another initialisation. Tokens are stored in diffusers' textual
inversion layout (``{token: (1, D)}``) so ``pipe.load_textual_inversion`` reads them.
"""

from __future__ import annotations

import torch
from museum.errors import TokenError


def word_vector(pipe, word: str) -> torch.Tensor:
    """Mean input embedding of the sub-tokens of ``word`` (a class word is usually one token)."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise TokenError(f"the word {word!r} has no tokens")
    table = pipe.text_encoder.get_input_embeddings().weight
    return table[ids].detach().float().mean(0)


def add_token(pipe, token: str, vector: torch.Tensor) -> int:
    """Add ``token`` with embedding ``vector``; return its id. Refuses tokens the vocabulary has."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if token in tokenizer.get_vocab():
        raise TokenError(f"the token {token!r} is already in the vocabulary; choose another concept name")
    tokenizer.add_tokens([token])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[token_id] = vector.to(encoder.dtype)
    return token_id


def initial_vector(pipe, mode: str, class_word: str, generator: torch.Generator) -> torch.Tensor:
    """A token's starting embedding: from the class word ("class") or random at the table's scale ("random")."""
    if mode == "class":
        return word_vector(pipe, class_word if class_word != "style" else "style")
    if mode == "random":
        table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
        return torch.randn(table.shape[1], generator=generator) * table.std() + table.mean(0)
    raise ValueError(f"token_init must be 'class' or 'random', not {mode!r}")


def token_vector(pipe, token: str) -> torch.Tensor:
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    return pipe.text_encoder.get_input_embeddings().weight[token_id].detach().clone().float()


def train_only_rows(embedding: torch.nn.Embedding, row_ids: list[int]):
    """Make ``embedding.weight`` trainable with gradients masked to ``row_ids``; returns the hook handle."""
    mask = torch.zeros(embedding.weight.shape[0], 1, dtype=embedding.weight.dtype, device=embedding.weight.device)
    mask[row_ids] = 1.0
    embedding.weight.requires_grad_(True)
    return embedding.weight.register_hook(lambda grad: grad * mask)
