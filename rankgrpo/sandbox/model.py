"""The offline base model: a byte-level BPE tokenizer trained on the sandbox text and a tiny,
randomly initialised ``Qwen2ForCausalLM``, saved like any hub checkpoint.

The tokenizer follows Qwen2's conventions: the same pre-tokenizer split (digits one by one,
punctuation runs keep their trailing newlines, so ")\\n" can be one token), ChatML turns,
``<|im_end|>`` as the end-of-turn and eos token. The chat template marks the assistant turn
with ``{% generation %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True,
return_dict=True)`` returns the SFT mask: the completion tokens and its ``<|im_end|>``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from rankgrpo.models import CHATML_TEMPLATE

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen2's pre-tokenizer regex.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The ChatML template with {% generation %} markers, shared with --chat-template chatml.
CHAT_TEMPLATE = CHATML_TEMPLATE


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 2048, *,
                    titles: Sequence[str] = (), years: Sequence[int] = ()):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Any NFC string round-trips (``decode(encode(x)) == x``): bytes are the base alphabet, the
    only normalisation is Unicode NFC (as in Qwen2) and no space cleanup is applied. Padding
    is on the left; pad is ``<|endoftext|>``.

    ``titles`` and ``years`` (the catalog's, with ``title_tokens``) become whole tokens: each
    title one token, matched only as a whole word, and each ``" (YYYY)"`` one token, so a list
    line costs three tokens and a title named in a conversation is the same token as in a list:

        "Silent Haunting 2 (2007)\n"  ->  ["Silent Haunting 2", " (2007)", "\n"]
        "I have seen Silent Haunting." ->  ["I", " have", " seen", " ", "Silent Haunting", "."]

    The longest title wins where one title starts another ("Silent Haunting" vs "Silent
    Haunting 2"). Text round-trips as before; offsets stay exact, so rank segmentation and the
    catalog constraint work on these tokens unchanged.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if titles or years:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in sorted(set(titles))]
                       + [AddedToken(f" ({int(y)})", normalized=False) for y in sorted(set(years))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN, padding_side="left",
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
        additional_special_tokens=[IM_START, IM_END],
    )


def build_base_model(tokenizer, *, hidden_size: int = 192, num_layers: int = 4, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 512, max_position_embeddings: int = 2048,
                     tie_embeddings: bool = True, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` sized for the tokenizer (float32; the output head
    tied to the input embeddings unless ``tie_embeddings`` is False).

    Initialisation is seeded without touching the global torch RNG state."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_embeddings, use_sliding_window=False,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    return model.eval()


def save_base_model(out_dir: str | Path, tokenizer, model) -> Path:
    """``save_pretrained`` both into ``out_dir`` (a directory any script takes as a model path).

    The tokenizer config names ``Qwen2Tokenizer``: the class ``AutoTokenizer`` picks for a
    Qwen2 model anyway, and it reads our ``tokenizer.json`` unchanged."""
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard save needs no progress bar
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
