"""Load a causal LM and its tokenizer, or build a small random one from a config.

`transformers` is only the model zoo here: architectures, tokenizers, chat templates and
`save_pretrained`. Everything is chosen by explicit arguments; nothing is switched on the
model's name.

    model = load_model("path/to/checkpoint", dtype="bfloat16", device="cuda")
    tokenizer = load_tokenizer("path/to/checkpoint")      # left padding, pad token set
    toy = tiny_model("llama", vocab_size=256)             # random weights, for tests
    config = qwen25_05b_config()                          # Qwen2.5-0.5B shapes, for benchmarks

A tokenizer without a chat template (a base model's, often) gets one with
`set_chat_template(tokenizer, "chatml")` or a Jinja file; the scripts expose it as
`--chat-template`. `end_of_turn_ids` finds the token the template closes an assistant turn
with, which must stop generation even when it is not the tokenizer's eos.

A local directory and a hub name go through the same `from_pretrained` call. A string that
can only be a path (absolute, or starting with "." or "~") must exist; a hub name that cannot
be fetched (offline, or no such repository) raises an `OSError` that says so.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16 (and the same for float32, float16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_source(path_or_name: str | os.PathLike) -> str:
    """Return the string to hand to `from_pretrained`, failing early on a missing local path.

    An existing directory is used as is. A string that can only be a path (absolute, starting
    with "." or "~", or with more than one "/") must exist. Anything else ("org/name") is
    treated as a hub name.
    """
    text = os.path.expanduser(str(path_or_name))
    if Path(text).exists():
        return text
    only_a_path = isinstance(path_or_name, Path) or os.path.isabs(text) or text.startswith(".")
    if only_a_path or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"model path {text!r} does not exist")
    return text


def _unavailable(path_or_name: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = " (HF_HUB_OFFLINE is set, so hub names cannot be fetched)" if offline else ""
    return OSError(
        f"could not load {path_or_name!r}: it is not a local directory with a model, and it could "
        f"not be fetched from the Hugging Face hub{hint}. Pass a local checkpoint directory, or a hub "
        f"name with network access. Original error: {type(err).__name__}: {err}"
    )


def load_tokenizer(path_or_name: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer set up for batched generation.

    - `padding_side = "left"`: prompts of different lengths end at the same column, so the
      next token of every row is predicted from the last column.
    - If the tokenizer has no pad token, the eos token is used as pad. This is safe in this
      package because every mask is built from lengths, never by comparing token values.
    """
    source = _check_source(path_or_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise _unavailable(source, err) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ChatML turns; the assistant turn is marked with {% generation %} so the SFT mask is exact.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))}


class ChatTemplateError(ValueError):
    """No usable chat template; the message says which option fixes it."""


def set_chat_template(tokenizer: PreTrainedTokenizerBase, spec: str = "", where: str = "the tokenizer") -> None:
    """Give ``tokenizer`` the chat template ``spec`` (a built-in name from ``CHAT_TEMPLATES`` or a
    Jinja file), or check that it already has one when ``spec`` is empty.

    A built-in template needs its turn markers to be single tokens of the vocabulary (they are
    in Qwen2 tokenizers, base or Instruct); otherwise pass a template file written for it.
    The template is saved with every checkpoint, so the next stage finds it without the option.
    """
    if not spec:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"{where}: the tokenizer has no chat template; pass --chat-template chatml (ChatML turns, for "
                "tokenizers with <|im_start|>/<|im_end|> tokens) or --chat-template FILE (a Jinja template)")
        return
    if spec in CHAT_TEMPLATES:
        template, markers = CHAT_TEMPLATES[spec]
        vocab = tokenizer.get_vocab()
        missing = [m for m in markers if m not in vocab]
        if missing:
            raise ChatTemplateError(f"--chat-template {spec}: the tokenizer of {where} has no {' / '.join(missing)} "
                                    "token; pass a Jinja template file written for its own special tokens")
    elif Path(spec).is_file():
        template = Path(spec).read_text(encoding="utf-8")
    else:
        raise ChatTemplateError(f"--chat-template {spec}: neither a built-in template ({', '.join(CHAT_TEMPLATES)}) "
                                "nor an existing file")
    tokenizer.chat_template = template


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template writes right after an assistant message, e.g.
    ``<|im_end|>`` (ChatML) or ``<|eot_id|>`` (Llama 3); [] if the template writes nothing, or
    plain text, there (or there is no template).

    SFT targets end with this token, so it must stop generation. It differs from the
    tokenizer's eos in base models (a base Qwen2.5 has eos ``<|endoftext|>`` but ChatML turns
    end with ``<|im_end|>``). Found by rendering a probe conversation, not by the model's name.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = "Probe reply 7319"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Probe question"},
                                          {"role": "assistant", "content": probe}], tokenize=False)
    end = text.rfind(probe)
    if end < 0:
        return []
    after = text[end + len(probe):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []


def load_model(
    path_or_name: str | os.PathLike,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Load a causal LM in `dtype` on `device`, in eval mode (dropout off; call `.train()` to train).

    `dtype` is explicit (default float32); pass "bfloat16" on a GPU.
    """
    source = _check_source(path_or_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    except OSError as err:
        raise _unavailable(source, err) from err
    return model.to(device).eval()


def model_config(
    arch: str = "qwen2",
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **extra,
) -> PretrainedConfig:
    """A decoder config for `arch` in {"qwen2", "llama"} with the given shapes (sdpa attention).

    `extra` fields go to the config class unchanged (e.g. `rms_norm_eps`, `rope_parameters`).

    Qwen2 has biases on the q/k/v projections and Llama has none; otherwise the two share
    the layout: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCHITECTURES)}")
    config_cls, _ = _ARCHITECTURES[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **extra,
    )
    config._attn_implementation = "sdpa"
    return config


def qwen25_05b_config(**overrides) -> Qwen2Config:
    """The shapes of Qwen2.5-0.5B(-Instruct): hidden 896, 24 layers, 14 query heads, 2 KV heads,
    MLP 4864, vocab 151,936, tied embeddings, RoPE theta 1e6, RMSNorm eps 1e-6.

    For benchmarks with random weights; `overrides` replace any field (e.g. num_layers=2).
    """
    fields = dict(
        vocab_size=151_936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    fields.update(overrides)
    return model_config("qwen2", **fields)


def model_from_config(
    config: PretrainedConfig,
    *,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Random weights for `config` (seeded, so two calls give the same model), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


def tiny_model(
    arch: str = "qwen2",
    vocab_size: int = 256,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A small randomly initialised causal LM for tests and CPU benchmarks.

    With the default init (std 0.02) a random model's next-token distribution is nearly
    uniform, which is what sampling benchmarks want. Tests that compare greedy paths pass a
    larger `initializer_range` (e.g. 0.5) so logits have clear margins and greedy text
    varies from step to step instead of repeating one token.
    """
    config = model_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        initializer_range=initializer_range,
    )
    return model_from_config(config, seed=seed, dtype=dtype, device=device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos, the model's generation-config eos ids,
    and the chat template's end-of-turn token (``rankgrpo.models.end_of_turn_ids``; SFT targets
    end with it, so a base model's tokenizer whose eos differs still stops after SFT)."""
    ids = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)}
    cfg_eos = model.generation_config.eos_token_id
    ids.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    return sorted(i for i in ids if i is not None)
