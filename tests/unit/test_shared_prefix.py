"""The prompt prefix that every row shares, run once: the SFT micro-batch (``collate_sft`` +
``sft_logits``) and the RL log-prob passes (``token_logprobs(..., share_prefix=True)``). The layouts
by hand, and the loss, log-probs and every gradient equal to those of whole rows."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rankgrpo.losses import sft_loss
from rankgrpo.kv_cache import left_pad, move_shared_prefix_left, positions_from_mask
from rankgrpo.logprobs import token_logprobs
from rankgrpo.sft_data import SFTSample, collate_sft, sft_logits, shared_prefix_length
from helpers import collate_right_padded

PAD = 0


def tiny_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).train()


def rows(prefix, parts):
    """SFTSamples: prefix + prompt tail (not targets) + completion (targets)."""
    return [SFTSample(prefix + tail + comp, [False] * (len(prefix) + len(tail)) + [True] * len(comp))
            for tail, comp in parts]


def test_shared_prefix_length_stops_at_the_first_difference_and_before_the_targets():
    a, b = rows([5, 6], [([7], [8, 9]), ([1, 8], [9, 9])])
    assert shared_prefix_length([a, b]) == 2
    assert shared_prefix_length([a]) == 2                      # first target at 3: at most 2
    assert shared_prefix_length([a, SFTSample([4, 6, 7, 8], [False, False, True, True])]) == 0
    assert shared_prefix_length(rows([5, 6, 7], [([], [8, 9]), ([], [8, 9])])) == 2  # not 3: 7 predicts 8


def test_collate_sft_lays_out_the_docstring_example():
    batch = collate_sft(rows([5, 6], [([7], [8, 9]), ([1, 8], [9, 9])]), PAD)
    assert batch.prefix_ids.tolist() == [5, 6]
    assert batch.input_ids.tolist() == [[PAD, 7, 8, 9], [1, 8, 9, 9]]
    assert batch.position_ids.tolist() == [[2, 2, 3, 4], [2, 3, 4, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch.labels_mask.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert batch.window == 3 and batch.window_labels()[:, 0].sum() == 0
    plain = collate_sft(rows([5, 6], [([7], [8, 9]), ([1, 8], [9, 9])]), PAD, share_prefix=False)
    assert plain.prefix_ids.numel() == 0 and plain.input_ids.tolist() == [[PAD, 5, 6, 7, 8, 9], [5, 6, 1, 8, 9, 9]]
    assert plain.position_ids[0, 1:].tolist() == [0, 1, 2, 3, 4]


def loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("share", [True, False])
def test_sft_logits_give_the_loss_and_gradients_of_full_rows(share):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, 40, (9,), generator=g).tolist()
    parts = [(torch.randint(1, 40, (n,), generator=g).tolist(), torch.randint(1, 40, (m,), generator=g).tolist())
             for n, m in ((3, 5), (7, 4), (1, 6), (4, 4))]
    samples = rows(prefix, parts)
    ids, attn, labels = collate_right_padded(samples, PAD)
    ref_loss, ref_grads = loss_and_grads(model, sft_loss(model(input_ids=ids, attention_mask=attn).logits,
                                                         labels, ids)[0])
    batch = collate_sft(samples, PAD, share_prefix=share)
    assert batch.prefix_ids.numel() == (9 if share else 0)
    assert batch.window == 7  # the longest completion (6) + the position that predicts its first token
    loss, grads = loss_and_grads(model, sft_loss(sft_logits(model, batch), batch.window_labels(),
                                                 batch.window_ids())[0])
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_garbage_in_the_padding_changes_nothing():
    model = tiny_model().eval()
    samples = rows([3, 4, 5, 6], [([7], [8, 9, 10]), ([1, 2, 8, 8, 8], [9, 11])])
    batch = collate_sft(samples, PAD)
    clean = sft_loss(sft_logits(model, batch), batch.window_labels(), batch.window_ids())[0]
    pads = batch.attention_mask[:, batch.prefix_ids.numel():] == 0
    assert pads.any()
    batch.input_ids[pads] = 33
    batch.position_ids[pads] = 77
    dirty = sft_loss(sft_logits(model, batch), batch.window_labels(), batch.window_ids())[0]
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)


def rollout_inputs(prefix, prompts, completions):
    """(input_ids, attention_mask, completion_start) as ``Rollout.model_inputs`` lays them out."""
    p_ids, p_mask = left_pad([prefix + t for t in prompts], PAD)
    c_ids, c_mask = (torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in cs], batch_first=True,
                                                     padding_value=v) for cs, v in
                     ((completions, PAD), ([[1] * len(c) for c in completions], 0)))
    return torch.cat([p_ids, c_ids], 1), torch.cat([p_mask.long(), c_mask], 1), p_ids.shape[1]


def test_move_shared_prefix_left_keeps_every_real_tokens_position():
    ids, mask, start = rollout_inputs([5, 6, 7], [[9, 9], [], [4]], [[1, 2], [3], [2, 2, 2]])
    p, ids2, mask2 = move_shared_prefix_left(ids, mask, start)
    assert p == 2                                   # the shortest prompt [5 6 7] keeps its last token
    assert (ids2[:, :2] == torch.tensor([5, 6])).all() and (mask2[:, :2] == 1).all()
    for row in range(3):  # the same (position, token) pairs, only moved
        before = {(int(q), int(t)) for q, t, m in zip(positions_from_mask(mask)[row], ids[row], mask[row]) if m}
        after = {(int(q), int(t)) for q, t, m in zip(positions_from_mask(mask2)[row], ids2[row], mask2[row]) if m}
        assert before == after
    assert torch.equal(ids2[:, start:], ids[:, start:])
    assert move_shared_prefix_left(*rollout_inputs([], [[5], [6]], [[1], [2]]))[0] == 0


def test_token_logprobs_with_a_shared_prefix_equal_whole_rows_and_their_gradients():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(1, 40, (n,), generator=g).tolist()  # noqa: E731
    ids, mask, start = rollout_inputs(rand(8), [rand(n) for n in (2, 6, 0, 3)], [rand(n) for n in (5, 2, 7, 4)])
    results = {}
    for share in (False, True):
        logp = token_logprobs(model, ids, mask, start, 0.7, share_prefix=share)
        results[share] = loss_and_grads(model, (logp * mask[:, start:]).sum()), logp.detach()
    (ref_loss, ref_grads), ref_logp = results[False]
    (loss, grads), logp = results[True]
    keep = mask[:, start:].bool()
    torch.testing.assert_close(logp[keep], ref_logp[keep], rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
