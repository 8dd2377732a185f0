"""`sample(..., compile=True)`: the static-cache, compiled one-token step against the eager
sampler, against `generate`, and against teacher-forced log-probs (CPU, torch.compile's
default mode; the CUDA-graph mode is covered by tests/components/test_cuda.py).

Compiling is the slow part (tens of seconds per graph on a busy CPU the first time; torch
keeps compiled kernels on disk, so later runs are faster). Every test here uses the same tiny
Qwen2 shapes and the same shape bucket (8 rows x 256 positions), so the file compiles one graph.
"""
from __future__ import annotations

import pytest
import torch

from rankgrpo.compiled_decode import (bucket_cache_length, bucket_rows, one_token_step,
                                      release_static_cache)
from rankgrpo.counter_rng import PromptKeys
from rankgrpo.models import model_config, model_from_config, tiny_model
from rankgrpo.sampling import left_pad, sample, token_logprobs

VOCAB = 128
BUCKET = [8, 256]  # every call below: at most 8 rows, prompt width + new tokens <= 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peaky_model():
    """Large init: greedy paths with clear argmax margins and varied tokens."""
    return tiny_model("qwen2", VOCAB, initializer_range=0.5, seed=1)


@pytest.fixture(scope="module")
def smooth_model():
    """Moderate init: non-uniform distributions with modest logits (float32-friendly)."""
    return tiny_model("qwen2", VOCAB, initializer_range=0.1, seed=2)


def random_prompts(lengths, seed=0, low=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g).tolist() for n in lengths]


def until_eos(tokens, eos_id):
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def compiled_graphs_of_the_step() -> int:
    """Graphs torch.compile holds for `one_token_step` in this process (0 if it never compiled)."""
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(one_token_step.__code__))


def assert_same_rollout(a, b, logprob_tol=1e-4):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.lengths, b.lengths)
    for flag in ("ended_with_eos", "stopped_at_items", "truncated"):
        assert torch.equal(getattr(a, flag), getattr(b, flag)), flag
    assert (a.logprobs - b.logprobs).abs().max() <= logprob_tol


def test_shape_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 384, 385)] == [1, 2, 4, 8, 8, 16, 64, 128, 384, 448]
    assert [bucket_cache_length(n) for n in (1, 255, 256, 257, 768, 769)] == [256, 256, 256, 512, 768, 1024]
    with pytest.raises(ValueError):
        bucket_rows(0)


def test_greedy_equals_eager_and_generate(peaky_model):
    model, max_new = peaky_model, 24
    prompts = random_prompts([5, 11, 2, 8, 3])
    # eos: a token that greedy decoding of prompt 0 emits at step 6, so rows end at different steps
    ids0 = torch.tensor([prompts[0]])
    free_run = model.generate(ids0, attention_mask=torch.ones_like(ids0), do_sample=False, max_new_tokens=max_new,
                              eos_token_id=VOCAB + 5, pad_token_id=0)[0, len(prompts[0]):].tolist()
    eos = free_run[6]
    ids, mask = left_pad(prompts, pad_token_id=0)
    generated = model.generate(ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new,
                               eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    expected = [until_eos(row.tolist(), eos) for row in generated]
    assert len({t for row in expected for t in row}) > 10, "greedy paths should vary"
    assert min(map(len, expected)) < max_new, "some row must stop at eos"

    kwargs = dict(group_size=1, max_new_tokens=max_new, greedy=True, eos_token_ids=eos)
    eager = sample(model, prompts, **kwargs)
    compiled = sample(model, prompts, **kwargs, compile=True)
    assert eager.decode_stats is None
    assert compiled.decode_stats["buckets"] == [BUCKET] and compiled.decode_stats["mode"] is None
    assert [compiled.completion_ids[i, : compiled.lengths[i]].tolist() for i in range(5)] == expected
    assert_same_rollout(compiled, eager)
    assert compiled_graphs_of_the_step() >= 1, "the step must really have been compiled"


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_same_token_streams_and_logprobs_as_eager(smooth_model, temperature, top_p):
    """Under one generator, the compiled path draws the same tokens as the eager one (with
    compaction off, which is what changes the eager path's random draws) and records the same
    behaviour log-probs; at top_p = 1 those equal the teacher-forced ones."""
    eos = 1
    prompts = random_prompts([6, 13, 3], seed=3)
    prompts[1][4] = eos  # an eos inside a prompt is just a prompt token
    kwargs = dict(group_size=2, max_new_tokens=16, temperature=temperature, top_p=top_p, eos_token_ids=eos)
    eager = sample(smooth_model, prompts, **kwargs, compact_fraction=1.0, generator=torch.Generator().manual_seed(0))
    compiled = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(0))
    assert_same_rollout(compiled, eager)
    assert len(set(compiled.lengths.tolist())) > 1, "rows should end at different steps"
    other_seed = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other_seed.completion_ids, compiled.completion_ids)
    if top_p == 1.0:
        input_ids, attention_mask, start = compiled.model_inputs()
        with torch.no_grad():
            recomputed = token_logprobs(smooth_model, input_ids, attention_mask, start, temperature)
        assert (recomputed - compiled.logprobs)[compiled.completion_mask].abs().max() <= 1e-4
    assert (compiled.logprobs[~compiled.completion_mask] == 0).all()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_same_token_streams_as_eager_under_prompt_keys(smooth_model, top_p):
    """With one key per prompt (how the trainers sample, keyed per step and prompt), the
    compiled path draws each prompt's group from its own key, like the eager path: the
    streams are equal whatever the eager path's compaction, and each prompt's group is the one
    it gets when sampled alone."""
    eos = list(range(1, 9))  # eight eos ids: rows end at varied steps, also inside a top-p nucleus
    prompts = random_prompts([6, 13, 3, 9], seed=4)
    seeds = [10, 11, 12, 13]
    kwargs = dict(group_size=2, max_new_tokens=16, top_p=top_p, eos_token_ids=eos)

    def generators(ss):
        return PromptKeys.from_ints(ss)

    compiled = sample(smooth_model, prompts, **kwargs, compile=True, generator=generators(seeds))
    assert compiled.decode_stats["buckets"] == [BUCKET]
    for compact_fraction in (1.0, 0.25):  # compaction off, and on (the default path)
        eager = sample(smooth_model, prompts, **kwargs, compact_fraction=compact_fraction,
                       generator=generators(seeds))
        assert_same_rollout(compiled, eager)
    assert len(set(compiled.lengths.tolist())) > 1, "rows should end at different steps"
    assert int((compiled.lengths < compiled.lengths.max()).sum()) >= 2, "the eager run at 0.25 must compact"
    single = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(single.completion_ids, compiled.completion_ids), "the keys must change the draws"
    for p, prompt in enumerate(prompts):
        alone = sample(smooth_model, [prompt], **kwargs, generator=generators([seeds[p]]))
        for s in range(2):
            n = int(alone.lengths[s])
            assert int(compiled.lengths[2 * p + s]) == n
            assert compiled.completion_ids[2 * p + s, :n].tolist() == alone.completion_ids[s, :n].tolist()
    with pytest.raises(ValueError, match="one per prompt"):
        sample(smooth_model, prompts, **kwargs, compile=True, generator=generators(seeds[:3]))


def test_prompt_batches_item_stop_and_no_recompile(smooth_model):
    """Two prompt batches of 8 rows share one bucket; the generator runs on from one batch to the
    next exactly as in the eager path; rows stop at eos, at 2 lines or at the budget; a second
    call compiles nothing and reuses the static cache."""
    counts = torch.zeros(VOCAB, dtype=torch.long)
    counts[20:28] = 1  # these ids "contain a newline"
    counts[28] = 2
    prompts = random_prompts([5, 9, 4, 7], seed=5)
    kwargs = dict(group_size=4, max_new_tokens=20, eos_token_ids=[1, 2, 3, 4], stop_after_items=2,
                  newline_counts=counts, prompt_batch_size=2)
    eager = sample(smooth_model, prompts, **kwargs, compact_fraction=1.0, generator=torch.Generator().manual_seed(7))
    first = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(7))
    assert_same_rollout(first, eager)
    assert first.stopped_at_items.any() and first.ended_with_eos.any() and first.truncated.any()
    assert first.decode_stats["buckets"] == [BUCKET, BUCKET]

    again = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(7))
    assert_same_rollout(again, first, logprob_tol=0)
    stats = again.decode_stats
    assert stats["graphs_compiled"] == 0 and stats["caches_allocated"] == 0
    assert stats["steps"] == sum(int(again.lengths[b * 8:(b + 1) * 8].max()) for b in range(2))
    live = int(again.lengths.sum())
    assert stats["idle_row_frac"] == pytest.approx(1 - live / (8 * stats["steps"]))

    release_static_cache(smooth_model)  # a fresh cache of the same bucket: reallocated, not recompiled
    fresh = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(7))
    assert fresh.decode_stats["caches_allocated"] == 1 and fresh.decode_stats["graphs_compiled"] == 0
    assert_same_rollout(fresh, first, logprob_tol=0)


def test_item_line_counter_stops_like_the_eager_path(smooth_model):
    """The evaluation stop (lines that hold text, `rankgrpo.stopping.ItemLineCounter`) ends the
    same rows at the same tokens in both paths: ids 20-27 are "\n", 28 is "\n\n", 30-49 are
    blank, the rest are text."""
    from rankgrpo.stopping import ItemLineCounter

    texts = ["x"] * VOCAB
    texts[20:28] = ["\n"] * 8
    texts[28] = "\n\n"
    texts[30:50] = [" "] * 20
    counter = ItemLineCounter.from_texts(texts)
    prompts = random_prompts([6, 4], seed=6)
    kwargs = dict(group_size=4, max_new_tokens=24, eos_token_ids=[1, 2], stop_after_items=2, line_counter=counter)
    eager = sample(smooth_model, prompts, **kwargs, compact_fraction=1.0, generator=torch.Generator().manual_seed(3))
    compiled = sample(smooth_model, prompts, **kwargs, compile=True, generator=torch.Generator().manual_seed(3))
    assert_same_rollout(compiled, eager)
    assert compiled.stopped_at_items.any() and compiled.decode_stats["buckets"] == [BUCKET]


def test_sliding_window_models_are_refused():
    config = model_config("qwen2", vocab_size=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    model = model_from_config(config)
    with pytest.raises(ValueError, match="full attention"):
        sample(model, [[5, 6, 7]], group_size=2, max_new_tokens=3, eos_token_ids=1, compile=True)


def test_compile_flag_reaches_the_sampler(monkeypatch):
    """--compile on train_rankgrpo.py and evaluate.py, and greedy validation passes it on to `sample`."""
    import evaluate
    import train_rankgrpo
    from rankgrpo import validation
    from rankgrpo.config import parse_config
    from rankgrpo.data import Example

    assert parse_config(train_rankgrpo.TrainRankGRPOConfig, ["--compile"]).compile
    assert not parse_config(train_rankgrpo.TrainRankGRPOConfig, []).compile
    assert parse_config(evaluate.EvaluateConfig, ["--model", "m", "--compile"]).compile
    assert train_rankgrpo.decode_log(None) == {}
    assert train_rankgrpo.decode_log({"graphs_compiled": 1, "idle_row_frac": 0.25, "steps": 9}) == {
        "decode/graphs_compiled": 1, "decode/idle_row_frac": 0.25}

    seen = []

    def fake_sample(model, prompts, **kwargs):
        seen.append(kwargs["compile"])
        return sample(model, prompts, **{**kwargs, "compile": False})

    class Tok:
        eos_token_id, pad_token_id = 1, 0

        def decode(self, ids, **_):
            return " ".join(map(str, ids))

    monkeypatch.setattr(validation, "sample", fake_sample)
    monkeypatch.setattr(validation, "chat_prompt_ids", lambda tok, ex: [5, 6, 7])
    monkeypatch.setattr(validation, "decode_completion", lambda ids, tok: str(ids))
    model = tiny_model("qwen2", VOCAB)
    examples = [Example(id="0", messages=[{"role": "user", "content": "hi"}], seen_titles=[], groundtruth=[])]
    for flag in (True, False):
        validation.greedy_completions(model, Tok(), examples, max_new_tokens=2, compile=flag)
    assert seen == [True, False]


def test_options_the_compiled_path_lacks_are_refused(smooth_model):
    """An option of the eager loop that the compiled one does not implement (e.g. a decoding
    constraint) fails loudly instead of being ignored."""
    from rankgrpo.compiled_decode import CompiledDecoder

    with pytest.raises(NotImplementedError, match="does not support constraint"):
        CompiledDecoder(smooth_model)(smooth_model, [[5, 6]], [0], None, G=1, max_new_tokens=2, temperature=1.0,
                                      top_p=1.0, greedy=False, eos_ids=torch.tensor([1]), stop_after_items=None,
                                      line_counter=None, generator=None, pad_token_id=0, constraint=object())
