"""Text embedders for Remap (PAPER.md 4.2): item metadata and conversations -> unit vectors.

Remap compares items and conversations by the cosine similarity of their embeddings.
The paper uses the sentence-transformer NovaSearch/stella_en_400M_v5; here two
embedders share one small interface (``id``, ``fit(texts)``, ``embed(texts)``):

* ``HashingEmbedder`` (spec ``"hashing"`` or ``"hashing:DIM"``, the default): character
  n-gram TF-IDF in numpy, no model and no extra dependency. Each text is normalised
  (NFKC, casefold, whitespace collapsed) and padded with a space; its character 3-, 4-
  and 5-grams are hashed into ``dim`` buckets with a fixed 64-bit hash (never Python's
  salted ``hash()``, so vectors are identical across processes and machines). A bucket's
  weight is ``(1 + log count) * idf`` with ``idf = log((1 + n) / (1 + df))`` fitted on
  the catalog's metadata texts (n texts, df of them contain the bucket): n-grams found
  in every catalog text, such as the template's "Keywords:", weigh nothing. Rows are
  L2-normalised, so a dot product is a cosine. A misspelled title shares most of its
  n-grams with the original, which is what mapping a teacher's misspellings needs.
* ``HFEmbedder`` (spec ``"hf:PATH"``): any local ``transformers`` encoder, mean-pooled
  over the attention mask, L2-normalised (stella, e5, bge, ... from a local directory).

``cached_embed`` stores each embedding matrix as ``.npy`` keyed by a hash of the
embedder id and the exact texts, written atomically, so a rerun skips the work.

    >>> emb = HashingEmbedder(dim=1024).fit(["Heat (1995)", "Alien (1979)", "Aliens (1986)"])
    >>> E = emb.embed(["Aliens (1986)", "Alienns (1986)", "Heat (1995)"])
    >>> E.shape, E.dtype
    ((3, 1024), dtype('float32'))
    >>> bool(E[1] @ E[0] > E[1] @ E[2])   # the misspelling is nearest its original
    True
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from rankgrpo.catalog import normalize_title
from rankgrpo.io import atomic_write_bytes


class Embedder(Protocol):
    """What Remap needs from an embedder.

    id:    a string that changes whenever the vectors would (part of the cache key).
    fit:   learn corpus statistics (IDF) from the catalog texts; returns self.
    embed: texts -> float32 array [len(texts), dim] with unit-norm rows (zero rows for
           texts with no features).
    """

    @property
    def id(self) -> str: ...

    def fit(self, texts: Sequence[str]) -> "Embedder": ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- hashing


_MULT = np.uint64(0x100000001B3)  # rolling polynomial base (the FNV prime)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of a uint64 array (deterministic, vectorised)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated code points [L] (uint64) and the text index of each position [L]."""
    prepared = [" " + normalize_title(t) + " " for t in texts]
    codes = np.frombuffer("".join(prepared).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    doc = np.repeat(np.arange(len(prepared)), [len(p) for p in prepared])
    return codes, doc


def hashed_ngram_counts(texts: Sequence[str], dim: int, ngram_range: tuple[int, int] = (3, 5)) -> np.ndarray:
    """Character n-gram counts hashed into ``dim`` buckets: float32 [len(texts), dim].

    The hash of the n-gram c_0..c_{n-1} is mix64((c_0 P^{n-1} + ... + c_{n-1}) xor n) mod dim
    (uint64 arithmetic, P the FNV prime), computed for every position of every text at
    once; n-grams that would cross from one text into the next are dropped.
    """
    codes, doc = _codepoints(texts)
    rows, cols = [], []
    for n in range(ngram_range[0], ngram_range[1] + 1):
        if len(codes) < n:
            continue
        m = len(codes) - n + 1
        h = codes[:m].copy()
        for j in range(1, n):
            h = h * _MULT + codes[j:j + m]
        h = _mix64(h ^ np.uint64(n))
        inside = doc[:m] == doc[n - 1:n - 1 + m]
        rows.append(doc[:m][inside])
        cols.append((h[inside] % np.uint64(dim)).astype(np.int64))
    flat = np.concatenate(rows) * dim + np.concatenate(cols) if rows else np.zeros(0, dtype=np.int64)
    counts = np.bincount(flat, minlength=len(texts) * dim)
    return counts.reshape(len(texts), dim).astype(np.float32)


class HashingEmbedder:
    """Character n-gram TF-IDF with deterministic feature hashing (see the module docstring).

    dim:         number of hash buckets = embedding size (4096: a 5,000 x 3,000 similarity
                 block is a 0.1 TFLOP matrix product, seconds on two cores).
    ngram_range: character n-gram sizes, inclusive.
    block_size:  texts hashed per numpy pass (memory ~ block_size * dim * 8 bytes).
    """

    def __init__(self, dim: int = 4096, ngram_range: tuple[int, int] = (3, 5), block_size: int = 512):
        self.dim = int(dim)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.block_size = block_size
        self.idf: np.ndarray | None = None

    @property
    def id(self) -> str:
        idf = "none" if self.idf is None else hashlib.blake2b(self.idf.tobytes(), digest_size=8).hexdigest()
        return f"hashing-v1:dim={self.dim}:ngrams={self.ngram_range[0]}-{self.ngram_range[1]}:idf={idf}"

    def fit(self, texts: Sequence[str]) -> "HashingEmbedder":
        """IDF over ``texts`` (the catalog's metadata): idf = log((1 + n) / (1 + df))."""
        df = np.zeros(self.dim, dtype=np.float64)
        for start in range(0, len(texts), self.block_size):
            df += (hashed_ngram_counts(texts[start:start + self.block_size], self.dim, self.ngram_range) > 0).sum(0)
        self.idf = np.log((1.0 + len(texts)) / (1.0 + df)).astype(np.float32)
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm TF-IDF vectors [len(texts), dim] (plain TF when not fitted)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.block_size):
            counts = hashed_ngram_counts(texts[start:start + self.block_size], self.dim, self.ngram_range)
            tf = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0).astype(np.float32)
            if self.idf is not None:
                tf *= self.idf
            out[start:start + len(counts)] = l2_normalize(tf)
        return out


# ----------------------------------------------------------------------------- transformers encoder


class HFEmbedder:
    """A local transformers encoder: mean pooling over the attention mask, L2-normalised.

    path:       a local model directory (AutoModel + AutoTokenizer).
    batch_size: texts per forward pass (texts are sorted by length to limit padding).
    max_length: tokens kept per text.
    """

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer  # lazy: the hashing embedder needs neither

        self.path = str(path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()

    @property
    def id(self) -> str:
        return f"hf-mean-v1:{self.path}:max_length={self.max_length}"

    def fit(self, texts: Sequence[str]) -> "HFEmbedder":
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = None
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [B, L, H]
                mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if out is None:
                    out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled.cpu().numpy()
        if out is None:
            out = np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return l2_normalize(out)


def make_embedder(spec: str = "hashing") -> Embedder:
    """``"hashing"``, ``"hashing:DIM"`` or ``"hf:PATH"`` -> an embedder."""
    if spec == "hashing":
        return HashingEmbedder()
    if spec.startswith("hashing:"):
        return HashingEmbedder(dim=int(spec.split(":", 1)[1]))
    if spec.startswith("hf:"):
        return HFEmbedder(spec[3:])
    raise ValueError(f"unknown embedder {spec!r} (use 'hashing', 'hashing:DIM' or 'hf:PATH')")


# ----------------------------------------------------------------------------- cache


def embedding_cache_key(embedder_id: str, texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(embedder_id.encode("utf-8"))
    h.update(json.dumps(list(texts), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def cached_embed(embedder: Embedder, texts: Sequence[str], cache_dir: str | Path | None) -> np.ndarray:
    """``embedder.embed(texts)``, stored as ``cache_dir/emb-<key>.npy`` (atomic) and reused.

    The key hashes the embedder id (which includes the fitted IDF) and the exact texts.
    An unreadable cache file is recomputed and overwritten. ``cache_dir=None`` disables it.
    """
    if cache_dir is None:
        return embedder.embed(texts)
    path = Path(cache_dir) / f"emb-{embedding_cache_key(embedder.id, texts)}.npy"
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape[0] == len(texts):
                return arr
        except (OSError, ValueError):
            pass
    arr = embedder.embed(texts)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return arr
