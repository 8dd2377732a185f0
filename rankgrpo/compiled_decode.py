"""The compiled decode path of `rankgrpo.sampling.sample(..., compile=True)`.

Why. The eager sampler runs one Hugging Face forward per new token: for a 24-layer model that
is several hundred small kernels launched one by one from Python. At RL batch sizes on a GPU
the launches, not the arithmetic or the memory traffic, are expected to set the speed (not yet
measured here: benchmarks/gpu_check.py measures it against the decode bound). The remedy (the one of
PyTorch's gpt-fast) is a one-token step with fixed shapes, compiled once and replayed: a
preallocated static KV cache, and `torch.compile(mode="reduce-overhead")`, which captures the
step as a CUDA graph (one launch per token). On a CPU `torch.compile`'s default mode is used.

What changes against the eager path (the prefill and the choice of each token are shared with it):

- The KV cache is a transformers `StaticCache` of [R, H, C, D] per layer, R rows by C
  positions, both rounded up to a shape bucket (`bucket_rows`, `bucket_cache_length`) so that
  one compiled graph serves every batch of its bucket. Each new bucket compiles once; the
  graphs that torch compiled during a call are counted in `Rollout.decode_stats`.
- The prompts are still prefilled once each (eager, variable shapes) and copied to their G
  rows, now into the static cache. Rows added to fill the bucket copy the batch's first row;
  their tokens are never recorded and they draw no random numbers.
- Finished rows stay in the batch until every row is done: removing them would change the
  shapes. Their share of the decoding work is reported (`idle_row_frac`) so the trade-off
  against the eager path's compaction can be measured.
- The attention mask is [R, C]: prompt padding 0, everything from the prompt's end on 1
  (positions not written yet are excluded by the causal rule, since the query sits at cache
  position `prompt width + t`).

Same results. Tokens are drawn by `rankgrpo.next_token.choose_row_tokens` from the real rows'
float32 logits only, so under one generator the token streams equal those of the eager path
with compaction off (`compact_fraction=1`), and the behaviour log-probs are recorded the same
way (same temperature and top-p semantics). Under `PromptKeys`, one key per prompt, each row's
draw at step t is a function of its prompt's key, t and its sample index alone, as in the eager
path, so the streams are equal whatever the eager path's compaction. A row still ends at its
first eos, at `stop_after_items` lines or at `max_new_tokens`; the loop stops at the step where
the last row ends, like the eager one, so a shared generator advances equally.

The static cache of the latest bucket stays allocated on the model between calls (a CUDA
graph replays on fixed addresses); `release_static_cache(model)` frees it.

    rollout = sample(model, prompts, group_size=8, max_new_tokens=256, eos_token_ids=eos,
                     compile=True)
    # 48 prompts of 512 tokens x G = 8 -> 384 rows, 512 + 256 positions -> bucket [384, 768]
    rollout.decode_stats   # e.g. {'mode': 'reduce-overhead', 'buckets': [[384, 768]], 'graphs_compiled': 1,
                           #       'caches_allocated': 1, 'steps': 256, 'idle_row_frac': 0.21}
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from rankgrpo.kv_cache import cache_keyword, prefill
from rankgrpo.next_token import choose_row_tokens

CACHE_BUCKET = 256  # cache positions are rounded up to a multiple of this
ROW_BUCKET = 64  # rows are rounded up to a power of two below this, to a multiple of it above
RECOMPILE_LIMIT = 64  # shape buckets torch may compile for the one-token step (torch's default is 8)


def bucket_rows(n: int) -> int:
    """Rows of the static batch for n real rows: the next power of two up to ROW_BUCKET, then the
    next multiple of ROW_BUCKET.

    >>> [bucket_rows(n) for n in (1, 6, 8, 40, 64, 65, 384)]
    [1, 8, 8, 64, 64, 128, 384]
    """
    if n < 1:
        raise ValueError("need at least one row")
    if n <= ROW_BUCKET:
        return 1 << (n - 1).bit_length()
    return math.ceil(n / ROW_BUCKET) * ROW_BUCKET


def bucket_cache_length(n: int) -> int:
    """Positions of the static cache for n needed (prompt width + max_new_tokens): the next
    multiple of CACHE_BUCKET.

    >>> [bucket_cache_length(n) for n in (1, 256, 257, 768)]
    [256, 256, 512, 768]
    """
    return math.ceil(n / CACHE_BUCKET) * CACHE_BUCKET


def compile_mode(device: torch.device) -> str | None:
    """torch.compile mode of the step: "reduce-overhead" (CUDA graphs) on CUDA, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


# --------------------------------------------------------------------------------------
# The compiled step and the static cache
# --------------------------------------------------------------------------------------


def one_token_step(model, cache, cache_keyword: str, input_ids, position_ids, attention_mask,
                   cache_position=None) -> torch.Tensor:
    """One decoding step for every row: float32 logits [R, V] of the token after input_ids.

    input_ids, position_ids: [R, 1]; attention_mask: [R, C] (C = the static cache's length);
    the cache writes each row's keys and values at its next position (the same for all rows).
    cache_position: [1], that write position, for transformers 4.x, whose static cache takes it
    from the forward (`takes_cache_position`); None where the cache keeps it (5.x).
    """
    where = {} if cache_position is None else {"cache_position": cache_position}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{cache_keyword: cache}, **where)
    return out.logits[:, -1].float()


@functools.lru_cache(maxsize=None)
def takes_cache_position(model_class) -> bool:
    """Whether the model's forward declares `cache_position` (transformers 4.x). 4.x's `StaticLayer`
    writes at the position the forward is given, and a forward given none derives it from the
    cache's contents (its non-zero slots); 5.x dropped the argument and keeps the position in the
    layer (`cumulative_length`)."""
    return "cache_position" in inspect.signature(model_class.forward).parameters


@functools.lru_cache(maxsize=None)
def compiled_step(mode: str | None):
    """`one_token_step` under torch.compile: whole graph, static shapes (one graph per shape bucket)."""
    return torch.compile(one_token_step, mode=mode, fullgraph=True, dynamic=False)


def _graphs_compiled() -> int:
    """Graphs torch.compile has produced in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (bucket, StaticCache)


def static_cache_for(model, rows: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[StaticCache, bool]:
    """The model's static cache for shape (rows, length), reused when the latest call had the same
    bucket, otherwise allocated (the previous one is dropped). Returns (cache, newly allocated)."""
    key = (rows, length, dtype, device)
    held = _STATIC_CACHES.get(model)
    if held is not None and held[0] == key:
        return held[1], False
    _STATIC_CACHES.pop(model, None)  # free the old buffers before allocating new ones
    config = model.config
    cache = StaticCache(config=config, max_cache_len=length)
    if not cache.layers or not all(type(layer) is StaticLayer for layer in cache.layers):
        raise ValueError(f"sample(compile=True) needs a model whose layers all use full attention; "
                         f"{type(model).__name__} has {sorted({type(l).__name__ for l in cache.layers})}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(batch_size=rows, num_heads=config.num_key_value_heads, head_dim=head_dim,
                               dtype=dtype, device=device)
    _STATIC_CACHES[model] = (key, cache)
    return cache, True


def release_static_cache(model) -> None:
    """Free the static KV cache that `sample(model, ..., compile=True)` keeps between calls."""
    _STATIC_CACHES.pop(model, None)


def _load_prompts(static: StaticCache, prefill_cache, source: torch.Tensor, width: int) -> None:
    """Copy the prefilled prompts' keys and values to their rows of the static cache, in place:
    static row r gets prefilled row source[r]; positions 0 .. width-1; the write position
    (cumulative_length, transformers 5.x; 4.x's layer has none) is set to width."""
    for layer, filled in zip(static.layers, prefill_cache.layers):
        layer.keys[:, :, :width].copy_(filled.keys[source, :, :width])
        layer.values[:, :, :width].copy_(filled.values[source, :, :width])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.fill_(width)


# --------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------


class CompiledDecoder:
    """Decodes prompt batches for `sample` with the compiled step; collects `stats` over the call.

    Called like `rankgrpo.sampling._sample_prompt_batch` (same arguments, `compact_fraction`
    ignored: finished rows stay; an option it does not know, given a value other than None,
    is refused). stats (what `Rollout.decode_stats` holds):
        mode             torch.compile mode ("reduce-overhead" or None for the default)
        buckets          [[rows, cache length], ...] of each prompt batch
        graphs_compiled  graphs torch compiled during this call: 0 when every bucket was
                         compiled before, 1 per new bucket; more would mean recompiles
        caches_allocated static caches allocated (a new bucket, or the first call)
        steps            decode steps run (all prompt batches)
        idle_row_frac    share of row-steps spent on bucket padding rows and finished rows
    """

    def __init__(self, model):
        device = next(model.parameters()).device
        self.mode = compile_mode(device)
        self.step = compiled_step(self.mode)
        self.cache_keyword = cache_keyword(type(model))
        self.pass_cache_position = takes_cache_position(type(model))
        self._graphs_before = _graphs_compiled()
        self._row_steps = 0
        self._live_row_steps = 0
        self._buckets: list[list[int]] = []
        self._caches = 0
        self._steps = 0

    @property
    def stats(self) -> dict:
        return {
            "mode": self.mode,
            "buckets": self._buckets,
            "graphs_compiled": _graphs_compiled() - self._graphs_before,
            "caches_allocated": self._caches,
            "steps": self._steps,
            "idle_row_frac": 1.0 - self._live_row_steps / max(self._row_steps, 1),
        }

    def __call__(self, model, prompts, batch, out, *, compact_fraction=None, **options):
        known = inspect.signature(self._decode).parameters
        unsupported = sorted(k for k, v in options.items() if k not in known and v is not None)
        if unsupported:
            raise NotImplementedError(f"sample(compile=True) does not support {', '.join(unsupported)} yet; "
                                      f"use compile=False")
        options = {k: v for k, v in options.items() if k in known}
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            self._decode(model, prompts, batch, out, **options)

    @torch.inference_mode()
    def _decode(
        self, model, prompts, batch, out, *, G, max_new_tokens, temperature, top_p, greedy, eos_ids,
        stop_after_items, line_counter, generator, pad_token_id,
    ):
        device = out.ids.device
        prefill_cache, logits, prompt_mask, prompt_lengths, index = prefill(
            model, [prompts[p] for p in batch], pad_token_id, 0, device
        )
        # Row r of this batch is sample r % G of prompt batch[r // G]; rows B .. R-1 fill the bucket.
        source = index.repeat_interleave(G)
        B, width = len(source), prompt_mask.shape[1]
        R, C = bucket_rows(B), bucket_cache_length(width + max_new_tokens)
        source_all = torch.cat([source, source[:1].expand(R - B)])
        cache, new = static_cache_for(model, R, C, prefill_cache.layers[0].keys.dtype, device)
        _load_prompts(cache, prefill_cache, source_all, width)
        del prefill_cache
        self._buckets.append([R, C])
        self._caches += int(new)

        rows = (torch.tensor(batch, device=device)[:, None] * G + torch.arange(G, device=device)).flatten()
        mask = torch.ones(R, C, dtype=torch.long, device=device)
        mask[:, :width] = prompt_mask[source_all]
        input_ids = torch.full((R, 1), pad_token_id, dtype=torch.long, device=device)
        positions = prompt_lengths[source_all][:, None].clone()  # position id of the next token fed
        # cache slot of the next token fed, the same for every row (transformers 4.x only)
        write = torch.tensor([width], device=device) if self.pass_cache_position else None
        logits = logits[source]
        ids = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        ended_eos = torch.zeros(B, dtype=torch.bool, device=device)
        ended_items = torch.zeros(B, dtype=torch.bool, device=device)
        lines = line_counter.start(B, device) if line_counter is not None else None  # line-count state
        finished = torch.zeros(B, dtype=torch.bool, device=device)

        for t in range(max_new_tokens):
            tokens, logprobs = choose_row_tokens(
                logits[:B], rows, G, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator,
                decode_step=t,
            )
            ids[:, t], logps[:, t] = tokens, logprobs
            is_eos = torch.isin(tokens, eos_ids)
            at_item_limit = torch.zeros_like(is_eos)
            if stop_after_items is not None:
                lines = line_counter.update(lines, tokens)
                at_item_limit = ~is_eos & (line_counter.closed(lines) >= stop_after_items)
            ends_now = ~finished if t == max_new_tokens - 1 else (is_eos | at_item_limit) & ~finished
            lengths.masked_fill_(ends_now, t + 1)
            ended_eos |= ends_now & is_eos
            ended_items |= ends_now & at_item_limit
            finished |= ends_now
            if bool(finished.all()):
                break
            input_ids[:B, 0] = tokens
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead
            logits = self.step(model, cache, self.cache_keyword, input_ids, positions, mask, write)
            positions += 1
            if write is not None:
                write += 1
        out.ids[rows] = ids
        out.logprobs[rows] = logps
        out.lengths[rows] = lengths
        out.eos[rows] = ended_eos
        out.items[rows] = ended_items
        self._steps += t + 1
        self._row_steps += R * (t + 1)
        self._live_row_steps += int(lengths.sum())
