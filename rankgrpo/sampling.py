"""Our own sampling loop with a KV cache, recording the log-prob of every token it draws.

Rank-GRPO needs G completions per prompt and the log-probability of every sampled token under
the policy that sampled it (the "old" / behaviour log-probs of the importance ratio).
`sample` produces both in one pass:

1. Prompts are sorted by length and processed in micro-batches of `prompt_batch_size`.
2. Each distinct prompt of a micro-batch is prefilled **once** (left padding, position ids
   from the padding mask), and its KV cache rows are then copied to its G sampling rows.
   `model.generate(num_return_sequences=G)` instead prefills every prompt G times.
3. Decoding feeds one token per row per step into a preallocated KV cache (a transformers
   `DynamicCache` whose layers write in place instead of concatenating). A row stops at its
   first eos token, at `max_new_tokens`, or (optionally) once it has closed
   `stop_after_items` lines (counted by a `rankgrpo.stopping` line counter). Finished rows
   are removed from the batch and from the cache (`Cache.batch_select_indices`) once they
   are `compact_fraction` of the batch, so they stop costing compute.
4. The token, and its log-probability under the exact distribution it was drawn from, go
   into preallocated output tensors, by global row index.

`token_logprobs` recomputes the same log-probs with one teacher-forced forward pass (for
the policy loss, with autograd, and for the frozen reference model, without). Both sides
scale the float32 logits by the same temperature, so at top_p = 1 the ratio of the freshly
sampled policy is exactly 1 up to float rounding.

Row order everywhere is prompt-major: rows p*G .. p*G + G-1 are prompt p's group.

Top-p. With top_p = 1 (what RL should use, and the paper's setting) the recorded log-prob is
log softmax(logits / T)[token], which `token_logprobs` reproduces. With top_p < 1 the token
is drawn from the renormalised nucleus, and the recorded log-prob is that truncated,
renormalised distribution's (the true behaviour probability). `token_logprobs` cannot
reproduce it (it knows nothing of the nucleus), so ratios against it would be biased; use
top_p < 1 for evaluation only. Greedy decoding (greedy=True or temperature=0) records the
model's log-prob at temperature T (or 1 when T = 0), not the log of the point mass (0).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from rankgrpo.counter_rng import PromptKeys
from rankgrpo.kv_cache import cache_argument, last_logits, left_pad, prefill
from rankgrpo.logprobs import token_logprobs  # noqa: F401  (public here too: rankgrpo.sampling.token_logprobs)
from rankgrpo.next_token import choose_row_tokens
from rankgrpo.segment import newline_table
from rankgrpo.stopping import NewlineCounter


# --------------------------------------------------------------------------------------
# The rollout record
# --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """G completions for each of P prompts, with masks and behaviour log-probs (B = P * G rows).

    Fields (rows are prompt-major: rows p*G .. p*G + G-1 belong to prompt p):
        prompts           list of P token-id lists, as given to `sample`
        prompt_index      LongTensor [B]     prompt of each row (= row // G)
        completion_ids    LongTensor [B, T]  sampled tokens; `pad_token_id` after the end
        completion_mask   BoolTensor [B, T]  True for tokens 0 .. lengths-1, i.e. through the
                                             first eos inclusive; built from lengths only
        logprobs          FloatTensor [B, T] float32 log-prob of each sampled token under the
                                             distribution it was drawn from; 0 outside the mask
        lengths           LongTensor [B]     completion tokens, eos included
        ended_with_eos    BoolTensor [B]     the last token is an eos token
        stopped_at_items  BoolTensor [B]     stopped after `stop_after_items` lines, no eos
        truncated         BoolTensor [B]     ran out of tokens (max_new_tokens), no eos
        group_size        G
        temperature, top_p, greedy           the sampling settings
        pad_token_id      the id written after each row's end
        decode_stats      with sample(compile=True): shape buckets, graphs compiled during the
                          call, idle share of the static batch (see rankgrpo.compiled_decode)

    T is the longest completion in the batch (at most max_new_tokens). Exactly one of
    ended_with_eos, stopped_at_items, truncated is True in each row.

    Example (G = 2, eos = 9, pad = 0): prompt 0 gave "4 7 9" and "5 5 5" (cut at 3 tokens),
        completion_ids  = [[4, 7, 9], [5, 5, 5]]
        completion_mask = [[1, 1, 1], [1, 1, 1]]     lengths = [3, 3]
        ended_with_eos  = [True, False]              truncated = [False, True]
    """

    prompts: list[list[int]]
    prompt_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    ended_with_eos: torch.Tensor
    stopped_at_items: torch.Tensor
    truncated: torch.Tensor
    group_size: int
    temperature: float
    top_p: float
    greedy: bool
    pad_token_id: int
    decode_stats: dict | None = None

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    def model_inputs(self, rows: torch.Tensor | Sequence[int] | None = None):
        """(input_ids, attention_mask, completion_start) for `token_logprobs` on `rows` (default all).

        The prompt part is left-padded to the longest prompt among the selected rows; the
        completion part keeps all T columns, so `token_logprobs(...)` lines up with
        `self.completion_mask[rows]` and `self.logprobs[rows]`. See `token_logprobs`.
        """
        rows = torch.arange(self.num_rows) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        rows = rows.to(self.completion_ids.device)
        prompt_ids, prompt_mask = left_pad(
            [self.prompts[i] for i in self.prompt_index[rows].tolist()],
            self.pad_token_id,
            device=self.completion_ids.device,
        )
        input_ids = torch.cat([prompt_ids, self.completion_ids[rows]], dim=1)
        attention_mask = torch.cat([prompt_mask, self.completion_mask[rows]], dim=1)
        return input_ids, attention_mask, prompt_ids.shape[1]


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def newline_counts_from_tokenizer(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """LongTensor [V]: how many "\\n" characters each token id decodes to (special tokens 0).

    The same table that ``rankgrpo.segment`` uses to assign tokens to ranks (built once per
    tokenizer and cached there), padded with zeros to V = max(len(tokenizer), vocab_size) for
    embedding rows beyond the tokenizer. Used by `sample(stop_after_items=...)`.
    """
    table = newline_table(tokenizer)
    size = max(len(table), vocab_size or 0)
    return torch.nn.functional.pad(table, (0, size - len(table)))


@contextlib.contextmanager
def _eval_mode(model):
    """Run in eval mode, then restore the previous mode. In training mode, Hugging Face
    layers with gradient checkpointing switch the KV cache off, which would break decoding."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_id_tensor(ids: int | Iterable[int], device) -> torch.Tensor:
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not ids:
        raise ValueError("eos_token_ids is empty: give at least one token id that ends a completion")
    return torch.tensor(ids, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------


class _Outputs:
    """Preallocated [B, max_new_tokens] output buffers, written by global row index."""

    def __init__(self, num_rows: int, max_new_tokens: int, pad_token_id: int, device):
        self.ids = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
        self.lengths = torch.full((num_rows,), max_new_tokens, dtype=torch.long, device=device)
        self.eos = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.items = torch.zeros(num_rows, dtype=torch.bool, device=device)


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_token_ids: int | Iterable[int],
    stop_after_items: int | None = None,
    generator: torch.Generator | PromptKeys | None = None,
    newline_counts: torch.Tensor | None = None,
    line_counter=None,
    tokenizer=None,
    pad_token_id: int | None = None,
    prompt_batch_size: int | None = None,
    compact_fraction: float = 0.125,
    compile: bool = False,
    constraint=None,
) -> Rollout:
    """Sample `group_size` completions for each prompt with a KV cache; see the module docstring.

    Args:
        model: a Hugging Face causal LM (e.g. Qwen2ForCausalLM, LlamaForCausalLM). It runs in
            eval mode while sampling (no dropout; gradient checkpointing, which turns the
            cache off in training mode, stays out of the way) and gets its mode back after.
        prompts: P token-id lists, of any lengths (no padding).
        group_size: G, completions per prompt. Output rows: B = P * G, prompt-major.
        max_new_tokens: the most completion tokens per row (eos included).
        temperature: logits are divided by it before softmax. 0 means greedy.
        top_p: nucleus sampling; 1 (no truncation) for RL, see the module docstring.
        greedy: argmax decoding (deterministic; every row of a group is then identical).
        eos_token_ids: id or ids that end a completion. A row ends at the first one it emits,
            which is part of the completion (and of its mask).
        stop_after_items: stop a row once it has closed this many lines. By default every
            "\\n" character closes a line (line k = rank k); needs `newline_counts` or `tokenizer`.
            With `line_counter`, the lines that counter counts.
        generator: torch.Generator on the model's device, for reproducible sampling; or
            `PromptKeys` (`rankgrpo.counter_rng`), one 64-bit key per prompt: the t-th token of
            sample s of prompt p is then drawn with one number, a function of (key p, t, s) alone,
            so prompt p's group does not depend on which other prompts are sampled with it (the
            same prompt gives the same group alone, in any batch, on any data-parallel rank,
            with or without `compile`), and drawing needs no host synchronisation. The draws of
            the whole call are computed at its start: 8 bytes per row and new token.
        newline_counts: LongTensor [V], "\\n" characters per token id (see
            `newline_counts_from_tokenizer`).
        line_counter: how lines are counted for `stop_after_items` (`rankgrpo.stopping`): e.g.
            `ItemLineCounter.from_tokenizer(tok)` counts only lines with text, for evaluation.
        tokenizer: used only to build `newline_counts` when that is not given.
        pad_token_id: written after each row's end and used to left-pad prompts (default: the
            first eos id); must be a valid token id. Masks never look at it, so pad == eos is fine.
        prompt_batch_size: prompts prefilled and decoded together (default all). Memory grows
            with prompt_batch_size * G * (prompt length + max_new_tokens).
        compact_fraction: finished rows are dropped from the batch and the KV cache once they
            make up this fraction of it (0: as soon as any row finishes). Dropping copies the
            cache, so waiting for a few rows bounds both the copies and the wasted decoding.
        compile: decode with a static KV cache and a compiled one-token step (CUDA graphs on
            a GPU); same tokens and log-probs, finished rows stay in the batch. See
            `rankgrpo.compiled_decode`; its figures go to `Rollout.decode_stats`.
        constraint: a `rankgrpo.constraint.CatalogConstraint` (default None: unconstrained, as
            in the paper). Every row then writes only catalog lines, no line twice, and the
            recorded log-probs are those of the masked, renormalised distribution, which
            `token_logprobs(..., constraint=constraint.for_rows(rollout.prompt_index))`
            recomputes. Its exclusion sets, if any, are one per prompt. Eager decode only: with
            `compile` it raises NotImplementedError.

    Returns: a `Rollout` (completion_ids [P*G, T], completion_mask, logprobs, lengths, ...).

    Example:
        rollout = sample(model, [[5, 6, 7], [8]], group_size=2, max_new_tokens=4,
                         eos_token_ids=9, generator=torch.Generator().manual_seed(0))
        rollout.completion_ids   # e.g. [[4, 7, 9, 9], [2, 2, 2, 2], [3, 9, 9, 9], [1, 9, 9, 9]]
        rollout.lengths          # [3, 4, 2, 2]; rows 0-1 are prompt 0, rows 2-3 prompt 1
    """
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError("group_size and max_new_tokens must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    device = next(model.parameters()).device
    eos_ids = _as_id_tensor(eos_token_ids, device)
    pad_token_id = int(eos_ids[0]) if pad_token_id is None else pad_token_id
    if not 0 <= pad_token_id < model.get_input_embeddings().num_embeddings:
        raise ValueError(f"pad_token_id={pad_token_id} is not a token id of the model; pass pad_token_id=")
    greedy = greedy or temperature == 0
    if stop_after_items is not None:
        if line_counter is None:
            if newline_counts is None and tokenizer is None:
                raise ValueError("stop_after_items needs newline_counts (LongTensor [V]) or tokenizer")
            if newline_counts is None:
                newline_counts = newline_counts_from_tokenizer(tokenizer, model.config.vocab_size)
            line_counter = NewlineCounter(newline_counts)
        line_counter = line_counter.to(device)
    else:
        line_counter = None
    if constraint is not None and constraint.num_groups() not in (None, len(prompts)):
        raise ValueError(f"constraint has {constraint.num_groups()} exclusion sets for {len(prompts)} prompts")
    if constraint is not None and compile:
        raise NotImplementedError("sample(compile=True) does not apply a constraint; use the eager decode")

    prompts = [list(map(int, p)) for p in prompts]
    if isinstance(generator, PromptKeys):
        if len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} prompt keys for {len(prompts)} prompts; give one per prompt")
        # every draw of the call, float64 [P * G, max_new_tokens]; each step takes its column
        generator = generator.to(device).draws(group_size, max_new_tokens)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, PromptKeys or None, not {type(generator).__name__}")
    G = group_size
    out = _Outputs(len(prompts) * G, max_new_tokens, pad_token_id, device)
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p]))  # similar lengths share a batch
    step = prompt_batch_size or len(prompts)
    decode = _sample_prompt_batch
    if compile:
        from rankgrpo.compiled_decode import CompiledDecoder  # loads torch.compile only when asked

        decode = CompiledDecoder(model)
    with _eval_mode(model):
        for start in range(0, len(prompts), step):
            decode(
                model, prompts, order[start : start + step], out,
                G=G, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                greedy=greedy, eos_ids=eos_ids, stop_after_items=stop_after_items,
                line_counter=line_counter, generator=generator, pad_token_id=pad_token_id,
                compact_fraction=compact_fraction, constraint=constraint,
            )

    T = int(out.lengths.max())
    mask = torch.arange(T, device=device) < out.lengths[:, None]
    return Rollout(
        prompts=prompts,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(G),
        completion_ids=out.ids[:, :T].masked_fill(~mask, pad_token_id),
        completion_mask=mask,
        logprobs=out.logprobs[:, :T].masked_fill(~mask, 0.0),
        lengths=out.lengths,
        ended_with_eos=out.eos,
        stopped_at_items=out.items,
        truncated=~(out.eos | out.items),
        group_size=G,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        pad_token_id=pad_token_id,
        decode_stats=decode.stats if compile else None,
    )


@torch.inference_mode()
def _sample_prompt_batch(
    model, prompts, batch, out: _Outputs, *, G, max_new_tokens, temperature, top_p, greedy,
    eos_ids, stop_after_items, line_counter, generator, pad_token_id, compact_fraction, constraint=None,
):
    """Prefill the prompts `batch` (indices into `prompts`) once, expand to G rows each, decode.

    Writes into `out`, allocated outside inference mode so that the Rollout's tensors can
    be used in autograd later. Rows that finished but are still in the batch keep writing
    tokens past their length; `sample` overwrites those with padding.
    """
    device = out.ids.device
    cache, logits, prompt_mask, prompt_lengths, index = prefill(
        model, [prompts[p] for p in batch], pad_token_id, max_new_tokens, device
    )
    # Expand: row r of this batch is sample r % G of prompt batch[r // G].
    source = index.repeat_interleave(G)
    cache.batch_select_indices(source)
    logits = logits[source]
    rows = (torch.tensor(batch, device=device)[:, None] * G + torch.arange(G, device=device)).flatten()
    width = prompt_mask.shape[1]
    # The attention mask of every step is a prefix of this buffer (prompt padding, then ones).
    mask = torch.cat([prompt_mask[source], prompt_mask.new_ones(len(rows), max_new_tokens)], dim=1)
    positions = prompt_lengths[source]  # position id of the next token fed to the model
    # Line-count state of each row (`rankgrpo.stopping`); a dummy [B] when there is no item stop.
    lines = (line_counter.start(len(rows), device) if line_counter is not None
             else torch.zeros(len(rows), device=device))
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    guide = None if constraint is None else constraint.start((rows // G).tolist())

    for t in range(max_new_tokens):
        if guide is not None:  # catalog constraint: disallowed tokens to -inf, then renormalised below
            logits = guide.mask_logits(logits)
        tokens, logprobs = choose_row_tokens(
            logits, rows, G, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator,
            decode_step=t,
        )
        out.ids[rows, t] = tokens
        out.logprobs[rows, t] = logprobs
        if guide is not None:
            guide.advance(tokens)
        is_eos = torch.isin(tokens, eos_ids)
        at_item_limit = torch.zeros_like(is_eos)
        if stop_after_items is not None:
            lines = line_counter.update(lines, tokens)
            at_item_limit = ~is_eos & (line_counter.closed(lines) >= stop_after_items)
        ends_now = (is_eos | at_item_limit) & ~finished
        if t == max_new_tokens - 1:
            ends_now = ~finished  # out of tokens: the rest are truncated
        if ends_now.any():
            ended = rows[ends_now]
            out.lengths[ended] = t + 1
            out.eos[ended] = is_eos[ends_now]
            out.items[ended] = at_item_limit[ends_now]
            finished |= ends_now
            n_finished = int(finished.sum())
            if n_finished == len(rows):
                break
            if n_finished >= compact_fraction * len(rows):
                # Drop finished rows from the batch and the cache: they cost nothing from now on.
                keep = (~finished).nonzero().squeeze(-1)
                rows, tokens, mask, positions = rows[keep], tokens[keep], mask[keep], positions[keep]
                lines, finished = lines[keep], finished[keep]
                cache.batch_select_indices(keep)
                if guide is not None:
                    guide.select(keep)
        logits = last_logits(
            model, input_ids=tokens[:, None], attention_mask=mask[:, : width + t + 1],
            position_ids=positions[:, None], use_cache=True, **cache_argument(model, cache),
        )
        positions = positions + 1
