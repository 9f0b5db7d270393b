"""Prompt tokens and embeddings of an SD1.x CLIP.

A concept's prompt token (``<name>``) stands for its embedding S*_ori through ComfyUI's public
``embedding:`` syntax: the tokenizer of the concept's CLIP rewrites the token to
``embedding:eqdiff-<digest>`` and searches a folder of its own (in ComfyUI's temp directory) before
the user's embeddings folders. Weights such as ``(<token>:1.2)`` work as for any textual inversion,
and nothing depends on the tokenizer's private methods.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re

import torch

from ...eqdiff_core.concept import write_safetensors
from .folders import temp_directory

FOLDER = "eqdiff-embeddings"


def _sd_tokenizer(tokenizer):
    """The SD1 tokenizer's inner CLIP-L tokenizer (``SDTokenizer``)."""
    return getattr(tokenizer, tokenizer.clip)


def _text_model(clip):
    return getattr(clip.cond_stage_model, clip.cond_stage_model.clip)


def token_table(clip) -> torch.Tensor:
    """The text encoder's token embedding table (vocabulary, D), as loaded (CLIP weight patches do not
    touch it)."""
    return _text_model(clip).transformer.get_input_embeddings().weight


def text_width(clip) -> int:
    return token_table(clip).shape[1]


def vocabulary_id(clip, word: str) -> int:
    """The id of ``word`` as one vocabulary entry, as the authors look their initializer up
    (``tokenizer.encode([word])`` bypasses BPE: ``ktn`` is entry 42170, not ``k`` + ``tn</w>``); a word
    that is no entry falls back to its first BPE piece."""
    inner = _sd_tokenizer(clip.tokenizer)
    vocab = inner.tokenizer.get_vocab()
    for entry in (word, word + "</w>"):
        if entry in vocab:
            return int(vocab[entry])
    return int(inner.tokenizer(word)["input_ids"][inner.tokens_start])


def text_rows(clip, text: str) -> torch.Tensor:
    """The vocabulary rows of ``text``'s BPE tokens, without the start and end tokens (k, D), float32 on
    the CPU."""
    inner = _sd_tokenizer(clip.tokenizer)
    ids = inner.tokenizer(text)["input_ids"][inner.tokens_start:-1]
    return token_table(clip)[ids].detach().to("cpu", torch.float32).clone()


def vocabulary_row(clip, word: str) -> torch.Tensor:
    """The embedding of ``word``'s vocabulary entry (D,), float32 on the CPU."""
    return token_table(clip)[vocabulary_id(clip, word)].detach().to("cpu", torch.float32).clone()


class ConceptTokenizer:
    """A CLIP tokenizer in which each concept token stands for its embedding (see the module doc)."""

    def __init__(self, inner, embeddings: dict[str, torch.Tensor]):
        self.inner = copy.copy(inner)
        sd_tokenizer = copy.copy(_sd_tokenizer(inner))
        self.folder = os.path.join(temp_directory(), FOLDER)
        searched = sd_tokenizer.embedding_directory
        searched = [] if searched is None else [searched] if isinstance(searched, str) else list(searched)
        sd_tokenizer.embedding_directory = [self.folder, *searched]
        setattr(self.inner, inner.clip, sd_tokenizer)
        self._key = sd_tokenizer.embedding_key
        self._vectors = {}
        self._names = {}
        for token, vector in embeddings.items():
            vector = vector.detach().to("cpu", torch.float32).contiguous()
            name = "eqdiff-" + hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:24]
            self._vectors[name], self._names[token] = vector, name
        tokens = sorted(embeddings, key=len, reverse=True)
        self._pattern = re.compile("|".join(rf"(?<![\w<>]){re.escape(t)}(?![\w<>])" for t in tokens)) if tokens else None

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f" embedding:{self._names[m.group(0)]} ", text)

    def _write_missing(self) -> None:
        """The embedding files, written on first use (ComfyUI empties its temp directory at start)."""
        for name, vector in self._vectors.items():
            path = os.path.join(self.folder, name + ".safetensors")
            if not os.path.isfile(path):
                write_safetensors({self._key: vector[None]}, path)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        self._write_missing()
        return self.inner.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def with_concept_tokens(clip, embeddings: dict[str, torch.Tensor]):
    """A clone of CLIP whose prompts may contain the given tokens ({token: (D,) embedding})."""
    patched = clip.clone()
    patched.tokenizer = ConceptTokenizer(clip.tokenizer, embeddings)
    return patched


def prompt_tokens(clip, prompt: str, embeddings: dict[str, torch.Tensor]) -> list[list]:
    """The CLIP-L token rows of ``prompt`` (77 each): an int id per token, the embedding tensor where a
    concept token is."""
    rows = ConceptTokenizer(clip.tokenizer, embeddings).tokenize_with_weights(prompt)[clip.tokenizer.clip_name]
    return [[token for token, *_ in row] for row in rows]


def real_tokens(clip, text: str) -> list:
    """The tokens of ``text`` between BOS and EOS as CLIP Text Encode sees them: int ids, and embedding
    tensors where a concept token or ``embedding:`` is. ValueError when the text needs more than one
    77-token row."""
    inner = _sd_tokenizer(clip.tokenizer)
    rows = clip.tokenize(text)[clip.tokenizer.clip_name]
    if len(rows) != 1:
        raise ValueError(f"'{text}' is longer than one CLIP row (75 tokens); shorten it")
    row = [token for token, *_ in rows[0]]
    end = next(i for i, t in enumerate(row) if i > 0 and not torch.is_tensor(t) and t == inner.end_token)
    return row[1:end]


def conditioning(clip, prompt: str) -> list:
    """CONDITIONING of a prompt, as CLIP Text Encode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
