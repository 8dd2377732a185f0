"""Text embedders for Remap (§2.2(i), App. A.1): item metadata and conversations -> unit vectors.

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
* ``HFEmbedder`` (spec ``"hf:PATH"``): a local ``transformers`` encoder. A directory in the
  sentence-transformers layout (``modules.json``: Transformer, Pooling, Dense, Normalize;
  stella, all-MiniLM, e5, bge, ...) gives the embeddings its model card defines, without the
  sentence-transformers package; a plain encoder is mean-pooled over the attention mask.
  Rows are L2-normalised for Remap's cosine.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

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


POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass
class DenseLayer:
    """y = activation(x @ weight.T + bias); weight [out, in], bias [out] or None."""

    weight: "torch.Tensor"
    bias: "torch.Tensor | None"
    activation: str  # a torch.nn class name, e.g. "Tanh" or "Identity"


@dataclass
class SentenceLayout:
    """The pipeline a sentence-transformers directory defines (``modules.json``, in ``idx`` order):
    Transformer -> Pooling -> Dense* -> Normalize?.

    transformer_dir: where the transformers model and tokenizer live (the module's ``path``; often the root).
    max_seq_length:  tokens kept per text (``sentence_bert_config.json``; None: the tokenizer's limit).
    do_lower_case:   lower-case texts before tokenising.
    pooling:         modes of ``1_Pooling/config.json``, concatenated in this order (``POOLING_MODES``).
    dense:           the Dense layers, in order.
    normalize:       a Normalize module ends the pipeline (unit L2 norm).
    """

    transformer_dir: Path
    max_seq_length: int | None = None
    do_lower_case: bool = False
    pooling: tuple[str, ...] = ("mean",)
    dense: list = field(default_factory=list)
    normalize: bool = False

    def describe(self) -> str:
        dense = ",".join(f"{d.weight.shape[1]}->{d.weight.shape[0]}:{d.activation}" for d in self.dense)
        return (f"pool={'+'.join(self.pooling)}:dense=[{dense}]:norm={int(self.normalize)}:"
                f"lower={int(self.do_lower_case)}:max_seq={self.max_seq_length}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _pooling_modes(config: dict, where: Path) -> tuple[str, ...]:
    """Both config styles: ``"pooling_mode": "mean"`` (or a list) and the older
    ``pooling_mode_*_token(s)`` booleans (concatenated in ``POOLING_MODES`` order)."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        keys = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        modes = tuple(m for m in POOLING_MODES if config.get(keys[m]))
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"{where}: unsupported pooling mode {bad or modes} (supported: {', '.join(POOLING_MODES)})")
    return modes


def _dense_layer(directory: Path) -> DenseLayer:
    import torch

    config = _read_json(directory / "config.json")
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{directory}: Dense module without model.safetensors or pytorch_model.bin")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    name = activation.rsplit(".", 1)[-1]
    if not activation.startswith("torch.") or not isinstance(getattr(torch.nn, name, None), type):
        raise ValueError(f"{directory}: activation {activation!r} is not a torch.nn module")
    bias = state.get("linear.bias") if config.get("bias", True) else None
    return DenseLayer(state["linear.weight"].float(), None if bias is None else bias.float(), name)


def read_sentence_layout(path: str | Path) -> SentenceLayout | None:
    """The ``SentenceLayout`` of a sentence-transformers directory, or None without ``modules.json``
    (a plain transformers encoder, which ``HFEmbedder`` mean-pools)."""
    root = Path(path)
    if not (root / "modules.json").is_file():
        return None
    modules = _read_json(root / "modules.json")
    layout = SentenceLayout(transformer_dir=root)
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        directory = root / module.get("path", "")
        if kind == "Transformer":
            layout.transformer_dir = directory
            for cfg_path in (directory / "sentence_bert_config.json", root / "sentence_bert_config.json"):
                if cfg_path.is_file():
                    cfg = _read_json(cfg_path)
                    layout.max_seq_length = cfg.get("max_seq_length")
                    layout.do_lower_case = bool(cfg.get("do_lower_case", False))
                    break
        elif kind == "Pooling":
            layout.pooling = _pooling_modes(_read_json(directory / "config.json"), directory / "config.json")
        elif kind == "Dense":
            layout.dense.append(_dense_layer(directory))
        elif kind == "Normalize":
            layout.normalize = True  # no files: sentence-transformers writes none for it
        else:
            raise ValueError(f"{root / 'modules.json'}: module type {module.get('type')!r} is not supported "
                             f"(supported: {', '.join(_ST_MODULES)})")
    return layout


def pool(hidden: "torch.Tensor", mask: "torch.Tensor", modes: Sequence[str]) -> "torch.Tensor":
    """Sentence vectors from token vectors: [B, L, H], mask [B, L] (1 = real token) -> [B, len(modes) * H].

    For one text of L real tokens h_1..h_L (padding on either side is ignored):
    cls = h_1; max = elementwise max; mean = sum / L; mean_sqrt_len_tokens = sum / sqrt(L);
    weightedmean = sum_i i h_i / sum_i i; lasttoken = h_L.
    """
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
    count = m.sum(1).clamp(min=1e-9)  # [B, 1]
    total = (hidden * m).sum(1)
    first = mask.to(torch.int64).argmax(1)  # first real token (left or right padding)
    last = mask.shape[1] - 1 - mask.to(torch.int64).flip(1).argmax(1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[rows, first])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode == "mean":
            out.append(total / count)
        elif mode == "mean_sqrt_len_tokens":
            out.append(total / count.sqrt())
        elif mode == "weightedmean":
            position = (torch.arange(mask.shape[1], device=hidden.device) - first[:, None] + 1).clamp(min=0)
            w = m * position.unsqueeze(-1).to(hidden.dtype)  # 1, 2, ... over the real tokens
            out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            out.append(hidden[rows, last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


class HFEmbedder:
    """A local transformers encoder; Remap uses its vectors L2-normalised.

    With a sentence-transformers layout (``modules.json``) the encoder computes what its model
    card defines: the Transformer module's tokenizer settings (``max_seq_length``,
    ``do_lower_case``), the pooling of ``1_Pooling/config.json`` (cls / max / mean /
    mean_sqrt_len_tokens / weightedmean / lasttoken, concatenated when several), each Dense
    layer with its activation, and Normalize. Without it: mean pooling over the attention mask.

    path:              a local model directory.
    batch_size:        texts per forward pass (texts are sorted by length to limit padding).
    max_length:        tokens kept per text (0: the layout's max_seq_length, else at most 512).
    trust_remote_code: run the model's own code (encoders such as stella_en_400M_v5 need it).
    """

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 0, device: str = "cpu",
                 trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer  # lazy: the hashing embedder needs neither

        self.path = str(path)
        self.batch_size = batch_size
        self.device = device
        self.layout = read_sentence_layout(self.path)
        source = str(self.layout.transformer_dir) if self.layout else self.path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code).to(device).eval()
        except ValueError as e:
            if not trust_remote_code and "trust_remote_code" in str(e):
                raise ValueError(f"{source}: the encoder ships its own model code; pass --trust-remote-code if "
                                 "you trust it") from None
            raise
        layout_max = self.layout.max_seq_length if self.layout else None
        self.max_length = max_length or layout_max or min(int(self.tokenizer.model_max_length), 512)

    @property
    def id(self) -> str:
        if self.layout is None:
            return f"hf-mean-v1:{self.path}:max_length={self.max_length}"
        return f"hf-st-v1:{self.path}:max_length={self.max_length}:{self.layout.describe()}"

    def fit(self, texts: Sequence[str]) -> "HFEmbedder":
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """The encoder's sentence embeddings [len(texts), dim] as its layout defines them (not
        normalised unless the layout says so)."""
        import torch

        layout = self.layout
        if layout is not None and layout.do_lower_case:
            texts = [t.lower() for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = None
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch)[0].float()  # [B, L, H]
                vectors = pool(hidden, batch["attention_mask"], layout.pooling if layout else ("mean",))
                for dense in layout.dense if layout else []:
                    vectors = vectors @ dense.weight.to(vectors.device).T
                    if dense.bias is not None:
                        vectors = vectors + dense.bias.to(vectors.device)
                    vectors = getattr(torch.nn, dense.activation)()(vectors)
                if layout is not None and layout.normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                if out is None:
                    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
                out[idx] = vectors.cpu().numpy()
        if out is None:
            out = np.zeros((0, self.dim), dtype=np.float32)
        return out

    @property
    def dim(self) -> int:
        if self.layout is not None and self.layout.dense:
            return int(self.layout.dense[-1].weight.shape[0])
        n_modes = len(self.layout.pooling) if self.layout else 1
        return n_modes * int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm rows of ``encode`` (Remap compares by cosine)."""
        return l2_normalize(self.encode(texts))


def make_embedder(spec: str = "hashing", *, trust_remote_code: bool = False) -> Embedder:
    """``"hashing"``, ``"hashing:DIM"`` or ``"hf:PATH"`` -> an embedder."""
    if spec == "hashing":
        return HashingEmbedder()
    if spec.startswith("hashing:"):
        return HashingEmbedder(dim=int(spec.split(":", 1)[1]))
    if spec.startswith("hf:"):
        return HFEmbedder(spec[3:], trust_remote_code=trust_remote_code)
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
