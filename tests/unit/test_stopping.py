"""The early stop of greedy evaluation counts lines with text, not "\\n" characters."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankgrpo.models import tiny_model
from rankgrpo.sampling import sample
from rankgrpo.stopping import ItemLineCounter, NewlineCounter, count_item_lines

PIECES = ["a", " b", "\n", "\n\n", "x\n", "\ny", " \n ", "p\n\nq", "", "  ", "1.", " (1995)", "\n \n", "z\n\n",
          "\nmid\n", "a\nb\nc"]


def run_counter(counter, ids):
    state = counter.start(1, "cpu")
    closed = []
    for t in ids:
        state = counter.update(state, torch.tensor([t]))
        closed.append(int(counter.closed(state)[0]))
    return closed


def test_tables_and_worked_example():
    texts = ["1", ". Heat (1995)", "\n\n", "2", ". Alien (1979)\nPi", "\n"]
    counter = ItemLineCounter.from_texts(texts, vocab_size=8)
    assert counter.newlines.tolist() == [0, 0, 2, 0, 1, 1, 0, 0]
    assert counter.head.tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
    assert counter.tail.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert run_counter(counter, range(6)) == [0, 0, 1, 1, 2, 3]
    assert count_item_lines("".join(texts)) == 3
    # the "\n"-counting stop of RL would have seen 4 lines
    assert run_counter(NewlineCounter(counter.newlines), range(6))[-1] == 4


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(PIECES) - 1), max_size=40))
def test_counter_equals_the_text_rule_after_every_token(ids):
    counter = ItemLineCounter.from_texts(PIECES)
    closed = run_counter(counter, ids)
    assert closed == [count_item_lines("".join(PIECES[i] for i in ids[: n + 1])) for n in range(len(ids))]


def test_a_double_spaced_list_with_a_preamble_is_not_cut_short():
    # 20 items, double-spaced, after a preamble: 41 "\n" characters but 21 lines with text
    text = "Here are some films:\n\n" + "\n\n".join(f"{i}. Film {i} (2001)" for i in range(1, 21)) + "\n"
    assert text.count("\n") == 41 and count_item_lines(text) == 21
    counter = ItemLineCounter.from_texts(list(text))  # one character per token
    closed = run_counter(counter, range(len(text)))
    # a stop after N + margin = 30 counted lines never fires on this 20-item list
    assert max(closed) == 21 < 30
    # the old rule (stop at the 20th "\n") would have kept 9 items: blank lines and the
    # preamble used up the budget
    twentieth_newline = [i for i, c in enumerate(text) if c == "\n"][19]
    assert text[: twentieth_newline + 1].count("Film") == 9


def word_tokenizer(words):
    backend = Tokenizer(tok_models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=words[0])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampler_stops_after_n_lines_with_text(arch):
    torch.manual_seed(0)
    vocab = 64
    model = tiny_model(arch, vocab, initializer_range=0.1, seed=2)
    # id 0 is eos; ids 1-9 whitespace with newlines (blank lines), 10-14 "w\n", the rest plain words
    blanks = ["\n", "\n\n", " \n", "\n ", "\t\n", "\n\t", "  \n", "\n  ", "\n\n\n"]
    texts = ["<eos>"] + blanks + [f"w{i}\n" for i in range(10, 15)] + [f"w{i}" for i in range(15, vocab)]
    texts[0] = ""  # eos decodes to nothing
    counter = ItemLineCounter.from_texts(texts)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(15, vocab, (n,), generator=g).tolist() for n in (4, 7)]
    r = sample(model, prompts, group_size=6, max_new_tokens=40, eos_token_ids=0, stop_after_items=3,
               line_counter=counter, generator=torch.Generator().manual_seed(0))
    assert r.stopped_at_items.any() and not r.stopped_at_items.all()
    blank_lines_skipped = 0
    for row in range(r.num_rows):
        ids = r.completion_ids[row, : r.lengths[row]].tolist()
        text = "".join(texts[i] for i in ids)
        before = "".join(texts[i] for i in ids[:-1])
        if r.stopped_at_items[row]:
            assert count_item_lines(text) >= 3 > count_item_lines(before)
            blank_lines_skipped += text.count("\n") > 3  # a "\n" stop would have ended it earlier
        else:
            assert count_item_lines(before) < 3
    assert blank_lines_skipped > 0
    # from_tokenizer decodes each id on its own (special tokens to "") and gives the same tables
    tok = word_tokenizer(["<eos>"] + texts[1:])
    built = ItemLineCounter.from_tokenizer(tok, vocab_size=vocab + 3)
    assert built.newlines.shape == (vocab + 3,) and not built.newlines[vocab:].any()
    for name in ("newlines", "head", "inner", "tail"):
        assert torch.equal(getattr(built, name)[:vocab], getattr(counter, name)), name


def test_greedy_evaluation_stops_on_lines_with_text(monkeypatch):
    """greedy_completions wires the text-line counter into the sampler (blank lines never count)."""
    from rankgrpo import validation
    from rankgrpo.data import Example

    vocab = 64
    model = tiny_model("qwen2", vocab, initializer_range=0.5, seed=1)
    blanks = ["\n", "\n\n", " \n", "\n ", "\t\n", "\n\t", "  \n", "\n  ", "\n\n\n"]
    tok = word_tokenizer(["<eos>"] + blanks + [f"w{i}\n" for i in range(10, 15)] + [f"w{i}" for i in range(15, vocab)])
    # no chat template on this tokenizer: prompts are given as ids
    monkeypatch.setattr(validation, "chat_prompt_ids", lambda tokenizer, ex: [15 + int(ex.id), 3, 40 - int(ex.id)])
    examples = [Example(id=str(i), messages=[{"role": "user", "content": f"p{i}"}], seen_titles=[], groundtruth=[])
                for i in range(12)]
    texts = validation.greedy_completions(model, tok, examples, max_new_tokens=80, stop_after_items=3)
    counts = [count_item_lines(t) for t in texts]
    assert max(counts) == 3
    assert any(c == 3 and t.count("\n") > 3 for c, t in zip(counts, texts)), texts


def test_validation_leaves_room_for_filtered_items(monkeypatch):
    from rankgrpo import validation

    seen = {}

    def fake_greedy(model, tokenizer, examples, **kwargs):
        seen.update(kwargs)
        return ["" for _ in examples]

    monkeypatch.setattr(validation, "greedy_completions", fake_greedy)
    validation.validate_generation(None, None, [], None, max_new_tokens=1024, n_items=20)
    assert seen["stop_after_items"] == 30 and seen["max_new_tokens"] == 1024
