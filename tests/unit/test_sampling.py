"""Our KV-cache sampler against Hugging Face `generate` and against teacher forcing.

Everything runs on CPU with tiny randomly initialised Qwen2 and Llama models (no download).
Greedy tests use a large init scale so that logits have clear margins and greedy text varies;
log-prob tests use a moderate one so that float32 rounding stays well below 1e-5.
"""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankgrpo.models import load_model, load_tokenizer, qwen25_05b_config, tiny_model
from rankgrpo.kv_cache import left_pad, positions_from_mask
from rankgrpo.logprobs import entropy_from_logits, selective_log_softmax
from rankgrpo.next_token import top_p_logprobs
from rankgrpo.sampling import Rollout, newline_counts_from_tokenizer, sample, token_logprobs

VOCAB = 128
ARCHS = ["qwen2", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ARCHS)
def peaky_model(request):
    """Large init: greedy paths with clear argmax margins and varied tokens."""
    return tiny_model(request.param, VOCAB, initializer_range=0.5, seed=1)


@pytest.fixture(scope="module", params=ARCHS)
def smooth_model(request):
    """Moderate init: non-uniform distributions with modest logits (float32-friendly)."""
    return tiny_model(request.param, VOCAB, initializer_range=0.1, seed=2)


def random_prompts(lengths, seed=0, low=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, max_new_tokens, eos_id):
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return out[0, len(prompt):].tolist()


def hf_tokens_until_eos(tokens, eos_id):
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


# ----------------------------------------------------------------------------- greedy parity


def test_greedy_equals_generate_per_prompt_and_batched(peaky_model):
    model, max_new = peaky_model, 24
    prompts = random_prompts([5, 11, 2, 8, 3])
    # Pick as eos a token that greedy decoding of prompt 0 emits at step 6, so at least one
    # row ends early (and leaves the batch) while the others go on.
    free_run = hf_greedy(model, prompts[0], max_new, eos_id=VOCAB + 5)
    eos = free_run[6]
    expected = [hf_tokens_until_eos(hf_greedy(model, p, max_new, eos), eos) for p in prompts]
    assert len({t for row in expected for t in row}) > 10, "greedy paths should vary"
    assert min(len(row) for row in expected) < max_new, "some row must stop at eos"

    for prompt_batch_size in (None, 2):
        rollout = sample(model, prompts, group_size=1, max_new_tokens=max_new, greedy=True,
                         eos_token_ids=eos, prompt_batch_size=prompt_batch_size)
        ours = [rollout.completion_ids[i, : rollout.lengths[i]].tolist() for i in range(len(prompts))]
        assert ours == expected
        assert rollout.ended_with_eos.tolist() == [row[-1] == eos for row in expected]

    # The same against one left-padded generate call.
    ids, mask = left_pad(prompts, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    assert [hf_tokens_until_eos(row.tolist(), eos) for row in batched] == expected


def test_greedy_is_deterministic_and_groups_identical(peaky_model):
    prompts = random_prompts([4, 9])
    a = sample(peaky_model, prompts, group_size=3, max_new_tokens=10, temperature=0.0, eos_token_ids=0)
    b = sample(peaky_model, prompts, group_size=3, max_new_tokens=10, greedy=True, eos_token_ids=0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    for p in range(2):
        group = a.completion_ids[p * 3 : p * 3 + 3]
        assert (group == group[0]).all()


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(smooth_model, temperature):
    eos = 1
    prompts = random_prompts([6, 13, 3, 9], seed=3)
    prompts[1][4] = eos  # an eos inside a prompt is just a prompt token
    rollout = sample(smooth_model, prompts, group_size=3, max_new_tokens=16, temperature=temperature,
                     eos_token_ids=eos, generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask, start = rollout.model_inputs()
    with torch.no_grad():
        recomputed = token_logprobs(smooth_model, input_ids, attention_mask, start, temperature)
    mask = rollout.completion_mask
    assert torch.isfinite(recomputed).all()
    assert (recomputed - rollout.logprobs)[mask].abs().max() < 1e-5
    # and the recorded log-probs are those of the temperature-scaled distribution, not T = 1
    if temperature != 1.0:
        plain = token_logprobs(smooth_model, input_ids, attention_mask, start, 1.0).detach()
        assert (plain - rollout.logprobs)[mask].abs().max() > 1e-2
    assert (rollout.logprobs[~mask] == 0).all()


def test_model_inputs_layout_and_row_subsets(smooth_model):
    prompts = [[5, 6, 7], [8]]
    rollout = sample(smooth_model, prompts, group_size=2, max_new_tokens=5, eos_token_ids=9,
                     pad_token_id=0, generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask, start = rollout.model_inputs()
    assert start == 3
    assert input_ids[:, :3].tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert attention_mask[:, :3].tolist() == [[True] * 3] * 2 + [[False, False, True]] * 2
    assert torch.equal(input_ids[:, 3:], rollout.completion_ids)
    assert torch.equal(attention_mask[:, 3:], rollout.completion_mask)
    # A subset of rows pads its prompts only as far as it needs to.
    sub_ids, sub_mask, sub_start = rollout.model_inputs(rows=[2, 3])
    assert sub_start == 1 and sub_ids[:, 0].tolist() == [8, 8]
    lp_sub = token_logprobs(smooth_model, sub_ids, sub_mask, sub_start).detach()
    lp_all = token_logprobs(smooth_model, input_ids, attention_mask, start).detach()
    mask = rollout.completion_mask[2:]
    assert (lp_sub - lp_all[2:])[mask].abs().max() < 1e-5


def test_token_logprobs_trains_and_rollout_tensors_work_in_autograd(smooth_model):
    rollout = sample(smooth_model, random_prompts([4, 7]), group_size=2, max_new_tokens=6,
                     eos_token_ids=1, generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask, start = rollout.model_inputs()
    smooth_model.zero_grad()
    logp = token_logprobs(smooth_model, input_ids, attention_mask, start, 0.7)
    assert logp.requires_grad
    # a policy-gradient-like loss that mixes in the rollout's own tensors
    ratio = torch.exp(logp - rollout.logprobs)
    loss = -(ratio * rollout.completion_mask).sum() / rollout.completion_mask.sum()
    loss.backward()
    grads = [p.grad for p in smooth_model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    smooth_model.zero_grad()
    with torch.no_grad():
        assert not token_logprobs(smooth_model, input_ids, attention_mask, start).requires_grad


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_selective_log_softmax_equals_naive_with_gradients(chunk_tokens):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    T = 0.7
    naive = (logits / T).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ours = selective_log_softmax(logits, tokens, T, chunk_tokens)
    torch.testing.assert_close(ours, naive.float())
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (g_naive,) = torch.autograd.grad((naive * upstream).sum(), logits)
    (g_ours,) = torch.autograd.grad((ours.double() * upstream).sum(), logits)
    torch.testing.assert_close(g_ours, g_naive, rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 6, 50, generator=g)).bfloat16()
    tokens = torch.randint(0, 50, (2, 6), generator=g)
    naive = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ours = selective_log_softmax(logits, tokens)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive)


def test_entropy_is_the_true_entropy(smooth_model):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 4, 9, generator=g)
    p = (logits / 0.8).softmax(-1)
    naive = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, 0.8, chunk_tokens=3), naive)
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 1, 9)), torch.tensor(math.log(9)))
    # model helper: same layout as token_logprobs, finite, at most log V
    rollout = sample(smooth_model, random_prompts([5, 2]), group_size=2, max_new_tokens=4,
                     eos_token_ids=1, generator=torch.Generator().manual_seed(0))
    inputs = rollout.model_inputs()
    _, h = token_logprobs(smooth_model, *inputs, return_entropy=True)
    logits = smooth_model(input_ids=inputs[0], attention_mask=inputs[1],
                          position_ids=positions_from_mask(inputs[1])).logits[:, inputs[2] - 1:-1]
    assert h.shape == rollout.completion_ids.shape and torch.allclose(h, entropy_from_logits(logits), atol=1e-5)
    assert (h > 0).all() and (h <= math.log(VOCAB) + 1e-4).all()


# ----------------------------------------------------------------------------- groups, RNG


def test_group_rows_share_prompt_and_sampling_is_reproducible(smooth_model):
    prompts = random_prompts([5, 8, 3])
    G = 4

    def run(seed):
        return sample(smooth_model, prompts, group_size=G, max_new_tokens=12, eos_token_ids=1,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.prompt_index.tolist() == [p for p in range(3) for _ in range(G)]
    input_ids, attention_mask, start = a.model_inputs()
    for p in range(3):
        rows = slice(p * G, (p + 1) * G)
        assert (input_ids[rows, :start] == input_ids[p * G, :start]).all()
        assert input_ids[p * G, start - len(prompts[p]) : start].tolist() == prompts[p]
        assert len({tuple(r) for r in a.completion_ids[rows].tolist()}) > 1, "G samples should differ"
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


# ----------------------------------------------------------------------------- masks


def check_rollout_invariants(r: Rollout, eos_ids, max_new_tokens):
    B, T = r.completion_ids.shape
    assert T == int(r.lengths.max()) <= max_new_tokens
    assert torch.equal(r.completion_mask, torch.arange(T) < r.lengths[:, None])
    flags = torch.stack([r.ended_with_eos, r.stopped_at_items, r.truncated]).long()
    assert (flags.sum(0) == 1).all(), "exactly one way to end"
    for row in range(B):
        tokens = r.completion_ids[row, : r.lengths[row]].tolist()
        eos_positions = [i for i, t in enumerate(tokens) if t in eos_ids]
        if r.ended_with_eos[row]:
            assert eos_positions == [len(tokens) - 1], "the first eos is the last masked token"
        else:
            assert eos_positions == []
        if r.truncated[row]:
            assert len(tokens) == max_new_tokens
        assert (r.completion_ids[row, r.lengths[row]:] == r.pad_token_id).all()
        assert (r.logprobs[row, r.lengths[row]:] == 0).all()


def test_masks_eos_included_truncation_flagged_pad_equal_to_eos(smooth_model):
    eos_ids = list(range(1, 9))  # 8 of 128 ids end a row: some rows stop, some run out
    prompts = random_prompts([4, 9, 6], seed=5)
    prompts[0][1] = 3  # eos inside a prompt
    kwargs = dict(group_size=6, max_new_tokens=12, eos_token_ids=eos_ids)
    r = sample(smooth_model, prompts, **kwargs, generator=torch.Generator().manual_seed(0))
    check_rollout_invariants(r, eos_ids, 12)
    assert r.ended_with_eos.any() and r.truncated.any()
    assert r.pad_token_id == eos_ids[0]  # the default pad is the first eos id
    # A different pad id changes nothing but the padding itself.
    r0 = sample(smooth_model, prompts, **kwargs, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.lengths, r0.lengths) and torch.equal(r.completion_mask, r0.completion_mask)
    assert torch.equal(r.logprobs, r0.logprobs)
    assert torch.equal(r.completion_ids[r.completion_mask], r0.completion_ids[r0.completion_mask])


def test_all_rows_truncated_when_eos_never_sampled(smooth_model):
    r = sample(smooth_model, random_prompts([3, 5]), group_size=2, max_new_tokens=7,
               eos_token_ids=VOCAB + 1, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    assert r.truncated.all() and r.completion_mask.all() and r.completion_ids.shape == (4, 7)


# ----------------------------------------------------------------------------- cost


class ForwardLog:
    """Records the [rows, positions] of every forward through the embedding layer."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: self.shapes.append(tuple(args[0].shape))
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_each_distinct_prompt_is_prefilled_once(smooth_model):
    prompts = random_prompts([6, 10, 4])
    prompts.append(list(prompts[0]))  # a duplicate prompt shares its prefill
    with ForwardLog(smooth_model) as log:
        sample(smooth_model, prompts, group_size=4, max_new_tokens=5, eos_token_ids=VOCAB + 1,
               pad_token_id=0, generator=torch.Generator().manual_seed(0))
    prefills = [s for s in log.shapes if s[1] > 1]
    assert prefills == [(3, 10)], "3 distinct prompts, one row each, padded to the longest"
    assert [s for s in log.shapes if s[1] == 1] == [(16, 1)] * 4  # 4 decode steps for 16 rows

    with ForwardLog(smooth_model) as log:
        sample(smooth_model, prompts[:3], group_size=4, max_new_tokens=3, eos_token_ids=VOCAB + 1,
               pad_token_id=0, prompt_batch_size=2, generator=torch.Generator().manual_seed(0))
    # longest prompts first: [10, 6] then [4]
    assert [s for s in log.shapes if s[1] > 1] == [(2, 10), (1, 4)]


def test_finished_rows_leave_the_batch(smooth_model):
    prompts, eos_ids = random_prompts([5, 7]), list(range(1, 17))
    with ForwardLog(smooth_model) as log:
        r = sample(smooth_model, prompts, group_size=8, max_new_tokens=15, eos_token_ids=eos_ids,
                   compact_fraction=0.0, generator=torch.Generator().manual_seed(0))
    decode_rows = [s[0] for s in log.shapes if s[1] == 1]
    active_after = [int((r.lengths > t + 1).sum()) for t in range(len(decode_rows))]
    assert decode_rows == active_after and decode_rows[-1] < 16
    check_rollout_invariants(r, eos_ids, 15)

    with ForwardLog(smooth_model) as log:  # compact once a quarter of the batch has finished
        r = sample(smooth_model, prompts, group_size=8, max_new_tokens=15, eos_token_ids=eos_ids,
                   compact_fraction=0.25, generator=torch.Generator().manual_seed(0))
    decode_rows = [s[0] for s in log.shapes if s[1] == 1]
    for t, n in enumerate(decode_rows):
        assert (n - int((r.lengths > t + 1).sum())) < 0.25 * n + 1e-9 or n == 16
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[-1] < 16
    check_rollout_invariants(r, eos_ids, 15)


@pytest.mark.parametrize("compact_fraction", [0.0, 0.3, 1.0])
def test_compaction_does_not_change_greedy_output(peaky_model, compact_fraction):
    prompts = random_prompts([5, 11, 2, 8, 3, 7, 4], seed=4)
    kwargs = dict(group_size=2, max_new_tokens=16, greedy=True, eos_token_ids=list(range(2, 7)))
    reference = sample(peaky_model, prompts, **kwargs, compact_fraction=1.0)  # never compacts
    r = sample(peaky_model, prompts, **kwargs, compact_fraction=compact_fraction)
    assert len(set(reference.lengths.tolist())) >= 3, "rows should finish at different steps"
    assert torch.equal(r.completion_ids, reference.completion_ids)
    assert torch.equal(r.lengths, reference.lengths)
    torch.testing.assert_close(r.logprobs, reference.logprobs)


# ----------------------------------------------------------------------------- stop_after_items


def test_stop_after_items(smooth_model):
    counts = torch.zeros(VOCAB, dtype=torch.long)
    counts[20:60] = 1  # these ids "contain a newline"
    counts[60:64] = 2  # these contain two (e.g. "\n\n")
    r = sample(smooth_model, random_prompts([5, 8]), group_size=6, max_new_tokens=30,
               eos_token_ids=1, stop_after_items=3, newline_counts=counts,
               generator=torch.Generator().manual_seed(0))
    check_rollout_invariants(r, [1], 30)
    assert r.stopped_at_items.any()
    for row in range(r.num_rows):
        lines = counts[r.completion_ids[row, : r.lengths[row]]].cumsum(0)
        if r.stopped_at_items[row]:
            assert lines[-1] >= 3 and (len(lines) == 1 or lines[-2] < 3)
        else:
            assert lines[-1] < 3 or (r.ended_with_eos[row] and lines[-2] < 3)
    with pytest.raises(ValueError, match="newline_counts"):
        sample(smooth_model, [[3, 4]], group_size=1, max_new_tokens=2, eos_token_ids=1, stop_after_items=2)


def word_tokenizer(words):
    backend = Tokenizer(tok_models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=words[0])


def test_newline_counts_from_tokenizer(smooth_model):
    tokenizer = word_tokenizer(["<eos>", "a", "b\n", "\n", "\n\n", "c"])
    assert newline_counts_from_tokenizer(tokenizer, vocab_size=8).tolist() == [0, 0, 1, 1, 2, 0, 0, 0]
    # sample(tokenizer=...) builds the same counts as passing them in
    words = [f"w{i}\n" if 20 <= i < 60 else f"w{i}" for i in range(VOCAB)]
    tokenizer = word_tokenizer(words)
    counts = newline_counts_from_tokenizer(tokenizer)
    assert counts.sum() == 40
    kwargs = dict(group_size=4, max_new_tokens=20, eos_token_ids=1, stop_after_items=2)
    a = sample(smooth_model, [[3, 4, 5]], **kwargs, tokenizer=tokenizer, generator=torch.Generator().manual_seed(0))
    b = sample(smooth_model, [[3, 4, 5]], **kwargs, newline_counts=counts, generator=torch.Generator().manual_seed(0))
    assert a.stopped_at_items.any() and torch.equal(a.lengths, b.lengths)


# ----------------------------------------------------------------------------- top-p


def test_top_p_logprobs_renormalise_the_nucleus():
    lp = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]).log()
    out = top_p_logprobs(lp, 0.7).exp()
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0], [0.0, 0.625, 0.375]]))
    assert torch.equal(top_p_logprobs(lp, 0.1).exp(), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_top_p_sampling_records_truncated_logprobs(smooth_model):
    prompts = random_prompts([5, 6])
    r = sample(smooth_model, prompts, group_size=4, max_new_tokens=8, top_p=0.5, eos_token_ids=1,
               generator=torch.Generator().manual_seed(0))
    full = token_logprobs(smooth_model, *r.model_inputs()).detach()
    mask = r.completion_mask
    assert (r.logprobs[mask] >= full[mask] - 1e-6).all()  # renormalising raises each probability
    assert (r.logprobs[mask] - full[mask]).max() > 0.1


# ----------------------------------------------------------------------------- helpers, models


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1, 0]])).tolist() == [[0, 0, 0, 1, 2, 2]]


def test_bad_arguments(smooth_model):
    with pytest.raises(ValueError):
        sample(smooth_model, [[1, 2], []], group_size=2, max_new_tokens=3, eos_token_ids=1)
    with pytest.raises(ValueError):
        sample(smooth_model, [[1, 2]], group_size=2, max_new_tokens=3, eos_token_ids=[])
    with pytest.raises(ValueError, match="pad_token_id"):
        sample(smooth_model, [[1, 2]], group_size=2, max_new_tokens=3, eos_token_ids=VOCAB + 1)


def test_load_model_round_trip_and_clear_errors(tmp_path, monkeypatch):
    model = tiny_model("llama", 64, seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hub"):
        load_tokenizer("no-such-org/no-such-model")


def test_qwen25_05b_config_shapes():
    c = qwen25_05b_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (896, 24, 14, 2, 4864, 151_936, True)
    assert type(tiny_model("llama", 32)).__name__ == "LlamaForCausalLM"
    assert type(tiny_model("qwen2", 32)).__name__ == "Qwen2ForCausalLM"
