"""Stage 1's data path (behaviour cloning, Eq. 2): tokenising (prompt, completion) pairs with the
chat template, the loss mask of the assistant turn, collation, and the logits of a micro-batch
whose rows share the prompt prefix that runs once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rankgrpo.data import Example, chat_prompt_ids
from rankgrpo.kv_cache import cache_argument, shared_prefix_cache, supports_logits_to_keep


@dataclass
class SFTSample:
    """input_ids: [L] prompt + completion tokens; labels_mask: [L] True where the token is a target;
    prompt_tokens_dropped: prompt tokens cut from the left to fit ``max_length``."""

    input_ids: list[int]
    labels_mask: list[bool]
    prompt_tokens_dropped: int = 0


class CompletionTooLong(ValueError):
    """The completion alone (targets and end-of-turn) does not fit the length budget."""


def tokenize_sft(tokenizer, example: Example, max_length: int = 0) -> SFTSample:
    """Render prompt + assistant completion with the chat template; the loss covers the assistant turn.

    The mask comes from the template's ``{% generation %}`` markers
    (``return_assistant_tokens_mask``). A template without them (many hub models) falls back
    to the prefix rule: everything after the rendered prompt with the generation header
    is a target (the completion and the turn's end token).

    Length: with ``max_length`` > 0 the *prompt* is cut from the left (``truncate_sft_left``),
    never the completion, so every row keeps all its targets and its end-of-turn token. A row
    whose completion part alone needs more than ``max_length - 1`` tokens raises
    ``CompletionTooLong`` (the caller counts and skips it).
    """
    if example.completion is None:
        raise ValueError(f"example {example.id}: no completion to learn from")
    messages = example.messages + [{"role": "assistant", "content": example.completion}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    mask = [bool(m) for m in out.get("assistant_masks", [])]
    if not any(mask):
        prompt = chat_prompt_ids(tokenizer, example.messages)
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"example {example.id}: the chat template renders the prompt differently with "
                             "and without the answer; cannot locate the completion tokens")
        mask = [i >= len(prompt) for i in range(len(ids))]
    sample = SFTSample(ids, mask)
    return truncate_sft_left(sample, max_length, example.id) if max_length else sample


def truncate_sft_left(sample: SFTSample, max_length: int, name: str = "") -> SFTSample:
    """Cut prompt tokens from the left until ``sample`` has ``max_length`` tokens.

    The completion part starts at the first target token and runs to the end (targets, the
    end-of-turn token and whatever the template writes after it). At least one prompt token
    is kept, since the first target is predicted from the token before it.

    >>> s = SFTSample([1, 2, 3, 4, 5, 6], [False, False, False, False, True, True])
    >>> truncate_sft_left(s, 4)
    SFTSample(input_ids=[3, 4, 5, 6], labels_mask=[False, False, True, True], prompt_tokens_dropped=2)
    >>> truncate_sft_left(s, 2, "x7")
    Traceback (most recent call last):
    ...
    rankgrpo.sft_data.CompletionTooLong: example x7: the completion needs 2 tokens + 1 of prompt, more than --max-length 2
    """
    n = len(sample.input_ids)
    if n <= max_length:
        return sample
    first_target = sample.labels_mask.index(True) if any(sample.labels_mask) else n
    completion = n - first_target
    if completion + 1 > max_length:
        raise CompletionTooLong(f"example {name}: the completion needs {completion} tokens + 1 of prompt, "
                                f"more than --max-length {max_length}")
    cut = n - max_length
    return SFTSample(sample.input_ids[cut:], sample.labels_mask[cut:], sample.prompt_tokens_dropped + cut)


def tokenize_sft_split(tokenizer, examples: Sequence[Example], max_length: int) -> tuple[list[SFTSample], dict]:
    """``tokenize_sft`` over a split: (kept samples, report). The report counts what was shortened
    and skipped, so nothing is lost silently::

        {"rows": 100, "kept": 99, "prompt_truncated": 21, "prompt_tokens_dropped": 8410,
         "skipped_completion_too_long": 1, "skipped_ids": ["17"]}
    """
    samples, skipped = [], []
    shortened = dropped = 0
    for ex in examples:
        try:
            s = tokenize_sft(tokenizer, ex, max_length)
        except CompletionTooLong:
            skipped.append(ex.id)
            continue
        shortened += s.prompt_tokens_dropped > 0
        dropped += s.prompt_tokens_dropped
        samples.append(s)
    return samples, {"rows": len(examples), "kept": len(samples), "prompt_truncated": shortened,
                     "prompt_tokens_dropped": dropped, "skipped_completion_too_long": len(skipped),
                     "skipped_ids": skipped[:100]}


def shared_prefix_length(samples: Sequence[SFTSample]) -> int:
    """P: how many leading tokens every sample has in common, kept clear of the targets.

    Every sample's tokens [0, P) are equal, and every sample's first target lies at index P + 1 or
    later, so each target and the position whose logit predicts it are outside the prefix. With
    the paper's prompt the P ~ 80 tokens of the fixed instruction are shared by every row.

    >>> a = SFTSample([5, 6, 7, 8, 9], [False, False, False, True, True])
    >>> b = SFTSample([5, 6, 1, 8, 9, 9], [False, False, False, False, True, True])
    >>> shared_prefix_length([a, b])                 # [5, 6] in common
    2
    >>> shared_prefix_length([a, SFTSample([5, 6, 7, 1], [False, False, True, True])])  # target at 2
    1
    """
    if not samples:
        return 0
    limit = min((s.labels_mask.index(True) if any(s.labels_mask) else len(s.input_ids)) for s in samples) - 1
    first = samples[0].input_ids
    n = 0
    while n < limit and all(s.input_ids[n] == first[n] for s in samples):
        n += 1
    return n


@dataclass
class SFTBatch:
    """A micro-batch for ``sft_logits``: the shared prompt prefix once, then each row's own tokens.

    The rows after the prefix are **left**-padded, so every completion ends in the last column
    and the logits that predict targets all lie in the last ``window`` columns. Masks and
    positions come from lengths, never from token values:

    prefix_ids: [P] (P = 0: nothing shared); input_ids: [B, L] the rows after the prefix;
    attention_mask: [B, P + L], 1 on the prefix and on each row's own tokens; position_ids:
    [B, L], P, P+1, ... over each row's tokens (pads get P; they are masked as keys and their
    outputs are never read); labels_mask: [B, L]; window: W, the last W columns hold every
    position whose logit predicts a target (column L - W is a prompt token in every row).

    Example, prefix [5, 6] and rows [5, 6, 7, 8, 9] / [5, 6, 1, 8, 9, 9] (targets 8 9 / 9 9)::

        input_ids      [[pad, 7, 8, 9],  [1, 8, 9, 9]]
        position_ids   [[2,   2, 3, 4],  [2, 3, 4, 5]]
        attention_mask [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
        labels_mask    [[0, 0, 1, 1],    [0, 0, 1, 1]]        window 3
    """

    prefix_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels_mask: torch.Tensor
    window: int

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.prefix_ids.to(device), self.input_ids.to(device), self.attention_mask.to(device),
                        self.position_ids.to(device), self.labels_mask.to(device), self.window)

    def window_ids(self) -> torch.Tensor:
        """input_ids of the last W columns: [B, W], aligned with ``sft_logits``'s output."""
        return self.input_ids[:, self.input_ids.shape[1] - self.window:]

    def window_labels(self) -> torch.Tensor:
        """labels_mask of the last W columns: [B, W] (its first column is all 0)."""
        return self.labels_mask[:, self.labels_mask.shape[1] - self.window:]


def collate_sft(samples: Sequence[SFTSample], pad_token_id: int, share_prefix: bool = True) -> SFTBatch:
    """Lay out ``samples`` as an ``SFTBatch``: the common prefix (``shared_prefix_length``) once
    when ``share_prefix`` and there are two rows or more, the rest left-padded."""
    if not samples:
        raise ValueError("collate_sft: no samples")
    p = shared_prefix_length(samples) if share_prefix and len(samples) > 1 else 0
    rest = [s.input_ids[p:] for s in samples]
    width = max(len(r) for r in rest)
    b = len(samples)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((b, p + width), dtype=torch.long)
    attn[:, :p] = 1
    pos = torch.full((b, width), p, dtype=torch.long)
    labels = torch.zeros((b, width), dtype=torch.bool)
    first_target = width
    for i, (s, r) in enumerate(zip(samples, rest)):
        q = width - len(r)  # left pads of row i
        ids[i, q:] = torch.tensor(r, dtype=torch.long)
        attn[i, p + q:] = 1
        pos[i, q:] = torch.arange(p, p + len(r))
        labels[i, q:] = torch.tensor(s.labels_mask[p:], dtype=torch.bool)
        if any(s.labels_mask[p:]):
            first_target = min(first_target, q + s.labels_mask[p:].index(True))
    window = width - max(first_target - 1, 0)
    return SFTBatch(torch.tensor(samples[0].input_ids[:p], dtype=torch.long), ids, attn, pos, labels, window)


def sft_logits(model, batch: SFTBatch) -> torch.Tensor:
    """Logits of the last ``batch.window`` columns: [B, W, V], position j predicts window_ids()[:, j + 1].

    With a shared prefix (P > 0) the prefix runs once, as a batch of one; its key/value cache
    is broadcast to the B rows and the rows run after it. Gradients flow through the cache into
    the prefix's computation, so loss and gradients equal those of B full rows up to float
    rounding (tests/unit/test_shared_prefix.py), at the cost of P + B * L tokens instead of B * (P + L).
    The head runs on the W columns only. ``model`` may be wrapped for data parallelism; the
    prefix pass calls the module inside a DDP wrapper, whose gradient hooks see one backward.
    """
    kwargs = {}
    p = batch.prefix_ids.numel()
    if p:
        cache = shared_prefix_cache(model, batch.prefix_ids, batch.input_ids.shape[0])
        kwargs = dict(use_cache=True, **cache_argument(model, cache))
    return _call_model(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, width=batch.window, **kwargs)


def _call_model(model, *, width: int, **kwargs) -> torch.Tensor:
    """model(**kwargs).logits of the last ``width`` positions (the head runs on those alone where
    the model's forward takes ``logits_to_keep``)."""
    if supports_logits_to_keep(model):
        return model(logits_to_keep=width, **kwargs).logits
    return model(**kwargs).logits[:, -width:]
