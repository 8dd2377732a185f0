"""Our own sampling loop with a KV cache, and the teacher-forced log-probs that match it.

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
import functools
import inspect
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from transformers import DynamicCache

from rankgrpo.segment import newline_table
from rankgrpo.stopping import NewlineCounter
from transformers.cache_utils import DynamicLayer


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


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device=None):
    """Left-pad token lists into (ids [N, L], mask [N, L] bool), L = the longest list.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[True, True, True], [False, False, True]])
    """
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    mask = torch.arange(width) >= (width - lengths)[:, None]
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    ids[mask] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 on each row's first real token (pads get 0).

    >>> positions_from_mask(torch.tensor([[0, 0, 1, 1, 1, 0]]))
    tensor([[0, 0, 0, 1, 2, 2]])
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def newline_counts_from_tokenizer(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """LongTensor [V]: how many "\\n" characters each token id decodes to (special tokens 0).

    The same table that ``rankgrpo.segment`` uses to assign tokens to ranks (built once per
    tokenizer and cached there), padded with zeros to V = max(len(tokenizer), vocab_size) for
    embedding rows beyond the tokenizer. Used by `sample(stop_after_items=...)`.
    """
    table = newline_table(tokenizer)
    size = max(len(table), vocab_size or 0)
    return torch.nn.functional.pad(table, (0, size - len(table)))


def supports_logits_to_keep(model) -> bool:
    # a DistributedDataParallel wrapper forwards keyword arguments to the model in `.module`
    return _forward_accepts_logits_to_keep(type(getattr(model, "module", model)))


@functools.lru_cache(maxsize=None)
def _forward_accepts_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def cache_argument(model, cache) -> dict:
    """The keyword argument that hands `cache` to `model.forward`: {"cache": cache} where the
    forward names that parameter (transformers 5.24 renamed it and keeps `past_key_values`
    only as a deprecated alias until 5.40), else {"past_key_values": cache} (4.x, early 5.x)."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


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


def _last_logits(model, **inputs) -> torch.Tensor:
    """float32 logits [N, V] of the last position (computing only that position when possible)."""
    if supports_logits_to_keep(model):
        inputs["logits_to_keep"] = 1
    return model(**inputs).logits[:, -1].float()


def _as_id_tensor(ids: int | Iterable[int], device) -> torch.Tensor:
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not ids:
        raise ValueError("eos_token_ids is empty: give at least one token id that ends a completion")
    return torch.tensor(ids, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------
# The KV cache
# --------------------------------------------------------------------------------------


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` that writes into a buffer [N, H, capacity, D] allocated once.

    `DynamicLayer.update` concatenates, i.e. copies the whole cache at every step; this
    layer writes the new position in place and returns a view of the filled part. Rows can
    still be selected (`batch_select_indices`), which is how finished rows leave the batch.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(n, h, self.capacity, key_states.shape[-1])
        self.values = value_states.new_empty(n, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.capacity}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


def new_kv_cache(model, capacity: int) -> DynamicCache:
    """A transformers `DynamicCache` for `model` whose full-attention layers are preallocated
    to `capacity` positions. Models with other layer kinds (sliding-window, linear attention)
    keep the stock dynamic layers."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


# --------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------


def top_p_logprobs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalised log-probs of the nucleus: the smallest set of most likely tokens whose
    mass reaches `top_p` (the most likely token is always kept); -inf elsewhere.

    logprobs: [N, V] normalised log-probs -> [N, V].
    Example: probs [0.5, 0.3, 0.2], top_p 0.7 -> nucleus {0, 1} -> probs [0.625, 0.375, 0].
    """
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf")).log_softmax(-1)


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [N], logprobs [N]).

    logits: float32 [N, V]. The log-prob is that of the distribution the token came from:
    log softmax(logits / T), restricted to and renormalised over the nucleus when top_p < 1.
    Greedy rows take the argmax and report log softmax(logits / T) (T = 1 when T = 0).
    uniform: optional U(0, 1) draws [N, V] to sample with instead of drawing from `generator`.
    """
    logprobs = (logits / (temperature if temperature > 0 else 1.0)).log_softmax(-1)
    if greedy:
        tokens = logits.argmax(-1)
    else:
        if top_p < 1.0:
            logprobs = top_p_logprobs(logprobs, top_p)
        # Exponential race, exact sampling from probs: argmax_v p_v / E_v with E_v ~ Exp(1)
        # (what torch.multinomial does for one draw, with a faster Exp(1) = -log U).
        if uniform is None:
            uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)
        # torch.rand can return exactly 0 (about once in 2^24 float32 draws): E = inf would score
        # every token 0 and argmax would pick token 0, allowed or not. The smallest normal float
        # keeps E finite (<= 87.3 in float32), so a token of probability 0 never beats one of
        # probability > 0; every draw U > 0 is left exactly as it was.
        race = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()
        tokens = (logprobs.exp() / race).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
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
        generator: torch.Generator on the model's device, for reproducible sampling; or a list
            of P generators, one per prompt: prompt p's group then draws only from generator p,
            so its completions do not depend on which other prompts are sampled with it (the
            same prompt gives the same group alone, in any batch, on any data-parallel rank,
            with or without `compile`).
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
    if isinstance(generator, Sequence) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts; give one per prompt")
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


def _prefill(model, prompts: list[list[int]], pad_token_id: int, max_new_tokens: int, device):
    """Run each distinct prompt once, left-padded, into a cache with room for max_new_tokens more.

    Returns (cache, last-position logits [U, V], prompt mask [U, L], prompt lengths [U], index);
    `index[i]` is the prefilled row of prompts[i] (identical prompts share one row).
    """
    row_of = {}
    for p in prompts:
        row_of.setdefault(tuple(p), len(row_of))
    distinct = list(row_of)
    index = torch.tensor([row_of[tuple(p)] for p in prompts], device=device)
    ids, mask = left_pad(distinct, pad_token_id, device=device)
    cache = new_kv_cache(model, capacity=ids.shape[1] + max_new_tokens)
    logits = _last_logits(
        model, input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
        use_cache=True, **cache_argument(model, cache),
    )
    return cache, logits, mask, mask.sum(-1), index


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
    cache, logits, prompt_mask, prompt_lengths, index = _prefill(
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
            logits, rows, G, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator
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
        logits = _last_logits(
            model, input_ids=tokens[:, None], attention_mask=mask[:, : width + t + 1],
            position_ids=positions[:, None], use_cache=True, **cache_argument(model, cache),
        )
        positions = positions + 1


def choose_row_tokens(
    logits: torch.Tensor,
    rows: torch.Tensor,
    G: int,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`choose_tokens` for one decoding step of `sample`: (tokens [N], logprobs [N]).

    logits: float32 [N, V] of the rows `rows` [N] (global row r = sample r % G of prompt r // G).
    With one generator (or none) the N rows draw together from it; with a list of generators,
    one per prompt, each row draws from its prompt's generator (`_group_uniforms`). The eager
    and the compiled decode paths both draw through here, so their token streams agree.
    """
    per_prompt = isinstance(generator, Sequence) and not greedy
    return choose_tokens(
        logits, temperature=temperature, top_p=top_p, greedy=greedy,
        generator=None if per_prompt else generator,
        uniform=_group_uniforms(generator, rows, G, logits.shape[-1]) if per_prompt else None,
    )


def _group_uniforms(generators: Sequence[torch.Generator], rows: torch.Tensor, G: int, V: int) -> torch.Tensor:
    """U(0, 1) draws [len(rows), V] for one decoding step, row r's from generators[r // G].

    Every prompt with a row still in the batch draws a full [G, V] block from its own generator,
    whichever of its rows are left, so sample s of prompt p at step t always uses row s of the
    t-th block of generator p. Example: G = 2, rows [0, 1, 5] -> prompt 0 draws u0 [2, V],
    prompt 2 draws u2 [2, V]; the result is [u0[0], u0[1], u2[1]]."""
    prompt = rows // G
    present = torch.unique(prompt)  # sorted
    blocks = torch.cat([torch.rand(G, V, generator=generators[p], device=rows.device)
                        for p in present.tolist()])
    return blocks[torch.searchsorted(present, prompt) * G + rows % G]


# --------------------------------------------------------------------------------------
# Teacher-forced log-probs and entropy
# --------------------------------------------------------------------------------------


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[token], computed and differentiated a chunk of rows at a time.

    Besides the logits themselves (saved as they are, e.g. bf16), neither pass holds a
    [B, T, V] tensor: forward keeps only the per-position log-sum-exp in float32, and
    backward rebuilds softmax a chunk at a time from the saved logits:
        d logp / d logits = (onehot(token) - softmax(logits / T)) / T.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, rows_per_chunk):
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], rows_per_chunk):
            z = logits[i : i + rows_per_chunk].float() / temperature
            lse[i : i + rows_per_chunk] = z.logsumexp(-1)
            out[i : i + rows_per_chunk] = z.gather(-1, tokens[i : i + rows_per_chunk, :, None]).squeeze(-1)
        out -= lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.rows_per_chunk = temperature, rows_per_chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        T, step = ctx.temperature, ctx.rows_per_chunk
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], step):
            g = grad_out[i : i + step, :, None]
            probs = (logits[i : i + step].float() / T - lse[i : i + step, :, None]).exp()
            chunk = (-probs * g).scatter_add_(-1, tokens[i : i + step, :, None], g)
            grad[i : i + step] = chunk / T
        return grad, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """log softmax(logits / temperature)[..., token] -> float32 [B, T], memory-lean, differentiable.

    logits [B, T, V] (any float dtype), tokens [B, T]. Work is done `chunk_tokens` positions
    (whole rows) at a time in float32.
    """
    rows_per_chunk = max(1, chunk_tokens // max(1, logits.shape[1]))
    return _SelectedLogProbs.apply(logits, tokens, float(temperature), rows_per_chunk)


@torch.no_grad()
def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position -> float32 [B, T] (no grad).

    H = logsumexp(z) - sum_v softmax(z)_v z_v, with z = logits / T, a chunk of rows at a time.
    """
    rows_per_chunk = max(1, chunk_tokens // max(1, logits.shape[1]))
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows_per_chunk):
        z = logits[i : i + rows_per_chunk].float() / temperature
        out[i : i + rows_per_chunk] = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)
    return out


def completion_logits(model, input_ids, attention_mask, completion_start: int, *,
                      share_prefix: bool = False) -> torch.Tensor:
    """Logits that predict the completion tokens: [B, T, V] in the model's dtype, T = L - completion_start.

    Position completion_start - 1 + j predicts token completion_start + j. Only those T
    positions go through the LM head when the model accepts `logits_to_keep`.

    ``share_prefix``: the prompt tokens that every row starts with (the paper's instruction)
    run once, as a batch of one, and the rows run after them on a broadcast key/value cache
    (`move_shared_prefix_left`, `shared_prefix_cache`): the same logits up to float rounding,
    for fewer tokens. Gradients flow through the cache into the prefix's computation.
    """
    T = input_ids.shape[1] - completion_start
    if completion_start < 1 or T < 1:
        raise ValueError(f"completion_start={completion_start} must lie in [1, {input_ids.shape[1] - 1}]")
    p = 0
    if share_prefix and input_ids.shape[0] > 1:
        p, input_ids, attention_mask = move_shared_prefix_left(input_ids, attention_mask, completion_start)
    kwargs = dict(input_ids=input_ids[:, p:], attention_mask=attention_mask,
                  position_ids=positions_from_mask(attention_mask)[:, p:], use_cache=False)
    if p:
        kwargs.update(use_cache=True, **cache_argument(model, shared_prefix_cache(model, input_ids[0, :p],
                                                                                  input_ids.shape[0])))
    if supports_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
    return model(**kwargs).logits[:, completion_start - 1 - p: -1]


def move_shared_prefix_left(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int):
    """(P, input_ids, attention_mask) with the prompt tokens every row starts with moved to columns [0, P).

    Prompts are left-padded (`Rollout.model_inputs`), so a shared prefix starts at a different
    column in each row. Each row's first P + pads columns are rotated so that its P prefix
    tokens come first and its pads after them; every other column stays. Positions from the
    mask (`positions_from_mask`) are unchanged for every real token, and so is the model's
    output. P stops one token short of the shortest prompt, whose last token predicts the
    first completion token.

    >>> ids = torch.tensor([[5, 6, 7, 1, 2], [0, 5, 6, 3, 4]])   # prompts [5 6 7] and [5 6]
    >>> mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    >>> p, ids2, mask2 = move_shared_prefix_left(ids, mask, 3)
    >>> p, ids2.tolist(), mask2.tolist()
    (1, [[5, 6, 7, 1, 2], [5, 0, 6, 3, 4]], [[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]])
    """
    prompt_mask = attention_mask[:, :completion_start].bool()
    pads = completion_start - prompt_mask.sum(1)                              # [B] left pads per row
    shortest = int(completion_start - pads.max())
    cols = torch.arange(completion_start, device=input_ids.device)
    # row b's prompt token j sits at column pads[b] + j; compare every row's first tokens with row 0's
    limit = max(shortest - 1, 0)
    src = (pads[:, None] + cols[None, :limit]).clamp(max=completion_start - 1)  # [B, limit]
    leading = input_ids[:, :completion_start].gather(1, src)
    same = (leading == leading[:1]).all(0)
    p = int(same.long().cumprod(0).sum()) if limit else 0
    if p == 0:
        return 0, input_ids, attention_mask
    c = cols[None, :]
    q = pads[:, None]
    source = torch.where(c < p, c + q, torch.where(c < p + q, c - p, c))     # [B, P_width]
    new_ids, new_mask = input_ids.clone(), attention_mask.clone()
    new_ids[:, :completion_start] = input_ids[:, :completion_start].gather(1, source)
    new_mask[:, :completion_start] = attention_mask[:, :completion_start].gather(1, source)
    return p, new_ids, new_mask


def shared_prefix_cache(model, prefix_ids: torch.Tensor, rows: int) -> DynamicCache:
    """Key/value cache of ``prefix_ids`` ([P]) run as a batch of one, broadcast to ``rows`` rows.

    The rows' own tokens then run on it (positions P, P+1, ...). Under autograd the cache
    carries the prefix's graph, so one backward pass reaches the prefix's computation too.
    ``model`` may be wrapped by DistributedDataParallel: the prefix runs on the inner module,
    whose parameters' gradient hooks fire once per backward pass all the same. (Not under
    FSDP2, which gathers a layer's weights for backward only through the layer's outputs.)
    """
    inner = getattr(model, "module", model)
    one = DynamicCache(config=inner.config)
    kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(inner) else {}
    inner(input_ids=prefix_ids[None], use_cache=True, **kwargs, **cache_argument(inner, one))
    cache = DynamicCache(config=inner.config)
    for i, layer in enumerate(one.layers):
        cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)
    return cache


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
    return_entropy: bool = False,
    constraint=None,
    share_prefix: bool = False,
):
    """Teacher-forced log-probs of the completion tokens -> float32 [B, T], T = L - completion_start.

    Layout (what `Rollout.model_inputs()` builds): each row is its prompt, left-padded to a
    common width P = completion_start, followed by its completion, right-padded to T:

        prompts [5, 6, 7] and [8]; completions [1, 2, E] and [3, E] (E = eos, pad = 0)
        input_ids      = [[5, 6, 7, 1, 2, E],
                          [0, 0, 8, 3, E, 0]]
        attention_mask = [[1, 1, 1, 1, 1, 1],
                          [0, 0, 1, 1, 1, 0]]     prompt tokens + completion tokens in the mask
        completion_start = 3
        position ids   = cumsum(attention_mask) - 1, so each row's first real token is at 0,
                         exactly as in `sample`
        result[b, j]   = log softmax(logits / temperature)[input_ids[b, 3 + j]] at position 2 + j
                       -> [[lp(1), lp(2), lp(E)], [lp(3), lp(E), junk]]

    Values outside the completion mask are finite but meaningless: multiply by the mask.
    Works with autograd (the policy loss) and under no_grad (old / reference log-probs);
    beyond the model's own logits no [B, T, V] tensor is held (see `selective_log_softmax`). With
    `return_entropy=True` it also returns the true entropy [B, T] of the same
    temperature-scaled distributions (no grad), from the same forward pass.

    With `constraint` (a `rankgrpo.constraint.CatalogConstraint` with one exclusion set per
    row, see `CatalogConstraint.for_rows`) the log-probs are those of the catalog-constrained,
    renormalised distribution that `sample(..., constraint=)` drew from: only the normaliser
    over each position's allowed ids is computed (`rankgrpo.constraint.constrained_logprobs`);
    the entropy is then that of the constrained distribution too. Outside the mask it gives 0.

    ``share_prefix``: run the prompt prefix that every row shares once (`completion_logits`).
    """
    logits = completion_logits(model, input_ids, attention_mask, completion_start, share_prefix=share_prefix)
    if constraint is not None:
        from rankgrpo.constraint import constrained_logprobs

        return constrained_logprobs(logits, input_ids[:, completion_start:], attention_mask[:, completion_start:],
                                    constraint, temperature, return_entropy=return_entropy)
    logp = selective_log_softmax(logits, input_ids[:, completion_start:], temperature, chunk_tokens)
    if return_entropy:
        return logp, entropy_from_logits(logits.detach(), temperature, chunk_tokens)
    return logp


@torch.no_grad()
def token_entropy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Entropy [B, T] of the temperature-scaled next-token distribution at each completion
    position (same layout as `token_logprobs`), for logging. Mask it like the log-probs."""
    logits = completion_logits(model, input_ids, attention_mask, completion_start)
    return entropy_from_logits(logits, temperature, chunk_tokens)
