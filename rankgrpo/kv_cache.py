"""The key/value cache plumbing that sampling and teacher-forced log-probs share.

- `new_kv_cache`: a transformers `DynamicCache` whose layers write into a buffer allocated once
  (`PreallocatedLayer`), so a decode step does not copy the whole cache.
- `prefill`: run each distinct prompt once, left-padded, into such a cache.
- `move_shared_prefix_left` and `shared_prefix_cache`: run the prompt prefix that every row of a
  batch shares once, and the rows on its broadcast cache.
- `cache_argument` / `cache_keyword`: the keyword under which a model's forward takes a cache
  (``cache`` from transformers 5.24, ``past_key_values`` before).

Position ids come from the attention mask (`positions_from_mask`), never from token values.
"""
from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
    return {cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def last_logits(model, **inputs) -> torch.Tensor:
    """float32 logits [N, V] of the last position (computing only that position when possible)."""
    if supports_logits_to_keep(model):
        inputs["logits_to_keep"] = 1
    return model(**inputs).logits[:, -1].float()


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


def prefill(model, prompts: list[list[int]], pad_token_id: int, max_new_tokens: int, device):
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
    logits = last_logits(
        model, input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
        use_cache=True, **cache_argument(model, cache),
    )
    return cache, logits, mask, mask.sum(-1), index


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
