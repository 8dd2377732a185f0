"""Our sampler on a real pretrained chat model (SmolLM2-135M-Instruct) with real prompts:
greedy tokens equal `generate`'s, and the recorded log-probs equal `generate`'s scores and
the teacher-forced ones; segmentation of what it samples is exact."""
from __future__ import annotations

import pytest
import torch

from rankgrpo.data import chat_prompt_ids
from rankgrpo.models import load_model, load_tokenizer
from rankgrpo.sampling import sample, token_logprobs
from rankgrpo.segment import token_ranks
from rankgrpo.models import eos_token_ids

pytestmark = pytest.mark.real

MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(smollm2, reddit_examples):
    """Four real prompts of different lengths (left padding is exercised)."""
    _, tokenizer = smollm2
    by_length = sorted(reddit_examples, key=lambda ex: len(ex.prompt_text))
    chosen = [by_length[i] for i in (0, 10, 30, 60)]
    return [chat_prompt_ids(tokenizer, ex) for ex in chosen]


def test_the_model_carries_its_chat_template_and_stops_on_im_end(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.convert_ids_to_tokens(eos_token_ids(model, tokenizer)) == ["<|im_end|>"]


def test_greedy_equals_generate_and_logprobs_match(smollm2, prompts):
    model, tokenizer = smollm2
    eos = eos_token_ids(model, tokenizer)
    rollout = sample(model, prompts, group_size=1, max_new_tokens=MAX_NEW_TOKENS, greedy=True,
                     eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        n = int(rollout.lengths[row])
        assert rollout.completion_ids[row, :n].tolist() == expected[:n] and n == len(expected), row
        logits = torch.stack(out.logits, dim=1)[0].float()  # [n, V]
        reference = logits.log_softmax(-1).gather(-1, torch.tensor(expected)[:, None]).squeeze(-1)
        diff = (rollout.logprobs[row, :n] - reference).abs().max().item()
        worst = max(worst, diff)
    # Batched and left-padded prefill against one unpadded prompt at a time: float32 rounding only.
    assert worst < 1e-4, worst

    input_ids, attention_mask, start = rollout.model_inputs()
    with torch.no_grad():
        teacher = token_logprobs(model, input_ids, attention_mask, start)
    mask = rollout.completion_mask
    assert (teacher - rollout.logprobs)[mask].abs().max().item() < 1e-4
    print(f"sampler vs generate: identical greedy tokens ({int(rollout.lengths.sum())} in {len(prompts)} rows), "
          f"max |log-prob difference| {worst:.1e}")


def test_sampled_completions_segment_exactly(smollm2, prompts):
    model, tokenizer = smollm2
    rollout = sample(model, prompts[:2], group_size=2, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                     eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    ids, mask = rollout.completion_ids, rollout.completion_mask
    assert torch.equal(token_ranks(ids, mask, tokenizer, method="fast"),
                       token_ranks(ids, mask, tokenizer, method="general"))
