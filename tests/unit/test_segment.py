"""Tests of rankgrpo.segment: hand-made vocabularies with forced token boundaries, a byte-level
BPE trained here on synthetic movie lists, and a property test over random completions
(fast path == general path == ranks read off ``parse_recommendations`` spans)."""
import doctest
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import rankgrpo.segment
from rankgrpo.parsing import parse_recommendations
from rankgrpo.segment import (
    decode_completion, fast_path_is_exact, newline_table, ranks_from_spans, token_char_starts, token_ranks,
    token_ranks_general,
)

SPECIAL = ["<eos>", "<pad>", "<unk>"]
PIECES = SPECIAL + [
    "Heat", " (", "1995", "1979", ")", ")\n", "\n\n", "\nAlien", "Alien", "\n", "no", " year", ")\n\nAl", "ien",
    "Am", "lie", "x", "<0xC3>", "<0xA9>", "<0x0A>",
]


def test_docstring_examples():
    assert doctest.testmod(rankgrpo.segment).failed == 0


# ---------------------------------------------------------------------------------------
# Tokenizers, built offline
# ---------------------------------------------------------------------------------------

def hand_tokenizer(decoder):
    """Exact token boundaries: a word-level vocabulary of the pieces above, joined by ``decoder``."""
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(PIECES)}, unk_token="<unk>"))
    backend.decoder = decoder
    return wrap(backend)


def wrap(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def hand_tok():
    """SentencePiece-like: pieces concatenated, "<0xNN>" pieces are raw bytes (byte fallback)."""
    return hand_tokenizer(decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]))


@pytest.fixture(scope="module")
def plain_tok():
    """Pieces concatenated as they are ("<0xC3>" is just text): newline counts add up exactly."""
    return hand_tokenizer(decoders.Fuse())


@pytest.fixture(scope="module")
def ctc_tok():
    """A decoder that merges repeated tokens, so "\\n" "\\n" decodes to one newline: newline
    counts are not additive and the fast path must not be used."""
    return hand_tokenizer(decoders.CTC(pad_token="<pad>", word_delimiter_token="|", cleanup=False))


WORDS = ["The", "Love", "Night", "Amélie", "Léon", "Garçon", "Über", "Cœur", "Heat", "Alien", "of", "and",
         "Return", "Dark", "Star", "City", "Noël", "Café", "Señor", "Ça", "Lost", "in", "Time"]
RARE = ["☃", "ǅ", "Ω", "🎬", "東京", "物語", "Ø", "ß"]  # never in the training text: split into bytes


def random_line(rng, words):
    u = rng.random()
    if u < 0.08:
        return ""  # blank line
    title = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
    if u < 0.18:
        return title  # no year: unparseable, keeps its rank
    line = f"{title} ({rng.randint(1920, 2024)})"
    if u < 0.24:
        line = f"{rng.randint(1, 20)}. **{line}**"
    return line


def random_completion(rng, words):
    n_lines = rng.choice([rng.randint(1, 19), 20, 20, rng.randint(21, 26)])
    text = "\n".join(random_line(rng, words) for _ in range(n_lines))
    return text + "\n" if rng.random() < 0.2 else text


@pytest.fixture(scope="module")
def bpe_tok():
    """Byte-level BPE trained on synthetic movie lists without the regex pre-split, so merges
    cross line ends (")\\n", "\\n\\n", ")\\nThe"); rare characters stay split into bytes."""
    rng = random.Random(1234)
    corpus = [random_completion(rng, WORDS) for _ in range(1500)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return wrap(backend)


def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode: byte-level alphabet character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes go to 256, 257, ...
    return {chr(c): b for b, c in zip(bs, cs)}


def test_byte_decoder_is_gpt2s():
    dec = gpt2_byte_decoder()
    assert dec["Ċ"] == 10 and dec["Ġ"] == 32 and dec["!"] == 33 and len(set(dec.values())) == 256


# ---------------------------------------------------------------------------------------
# Hand cases with exact expected rank ids
# ---------------------------------------------------------------------------------------

def ids_of(tok, pieces):
    vocab = tok.get_vocab()
    return [vocab[p] for p in pieces]


def assert_ranks(tok, pieces, expected):
    """All three ways agree with ``expected``: general path, fast path, parse spans."""
    ids = torch.tensor([ids_of(tok, pieces)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert token_ranks_general(ids, mask, tok)[0].tolist() == expected
    assert token_ranks(ids, mask, tok, method="fast")[0].tolist() == expected
    assert token_ranks(ids, mask, tok)[0].tolist() == expected
    text, starts = token_char_starts(ids[0].tolist(), tok)
    items = parse_recommendations(text)
    assert ranks_from_spans(items, starts) == expected
    return text, items


def test_newline_table(hand_tok, plain_tok):
    pieces = [")\n", "\n\n", ")\n\nAl", "<0x0A>", "Heat", "<eos>", "<pad>"]
    assert newline_table(hand_tok)[ids_of(hand_tok, pieces)].tolist() == [1, 2, 2, 1, 0, 0, 0]
    assert newline_table(plain_tok)[ids_of(plain_tok, pieces)].tolist() == [1, 2, 2, 0, 0, 0, 0]
    assert fast_path_is_exact(plain_tok)


def test_byte_fallback_can_hide_a_newline_so_the_fast_path_is_not_used(hand_tok):
    # A lone lead byte before the newline byte: the run C3 0A is invalid and decodes to two U+FFFD.
    pieces = ["x", "<0xC3>", "<0x0A>", "x", "<eos>"]
    ids = torch.tensor([ids_of(hand_tok, pieces)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert decode_completion(ids[0], hand_tok) == "x\ufffd\ufffdx"   # one line for the parse
    assert token_ranks(ids, mask, hand_tok, method="fast").tolist() == [[0, 0, 0, 1, 1]]   # wrong here
    assert token_ranks_general(ids, mask, hand_tok).tolist() == [[0, 0, 0, 0, 0]]
    assert not fast_path_is_exact(hand_tok)
    assert token_ranks(ids, mask, hand_tok).tolist() == [[0, 0, 0, 0, 0]]


def test_newline_token_closes_its_rank(hand_tok):
    text, items = assert_ranks(hand_tok, ["Heat", " (", "1995", ")\n", "Alien", " (", "1979", ")", "<eos>"],
                               [0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert text == "Heat (1995)\nAlien (1979)"
    assert [(it.title, it.year) for it in items] == [("Heat", 1995), ("Alien", 1979)]


def test_double_newline_token_leaves_a_blank_rank(hand_tok):
    text, items = assert_ranks(hand_tok, ["Heat", " (", "1995", ")", "\n\n", "Alien", "<eos>"],
                               [0, 0, 0, 0, 0, 2, 2])
    assert [it.title for it in items] == ["Heat", "", "Alien"]  # rank 1 is the blank line, with no tokens


def test_token_starting_with_newline_belongs_to_the_line_it_closes(hand_tok):
    # "\nAlien" starts with the "\n" that closes line 0, so its first character is in rank 0.
    assert_ranks(hand_tok, ["Heat", "\nAlien", "<eos>"], [0, 0, 1])


def test_newlines_in_the_middle_of_a_token(hand_tok):
    assert_ranks(hand_tok, ["Heat", " (", "1995", ")\n\nAl", "ien", "<eos>"], [0, 0, 0, 0, 2, 2])


def test_unparseable_line_keeps_its_rank(hand_tok):
    _, items = assert_ranks(hand_tok, ["Heat", ")\n", "no", " year", "\n", "Alien", "<eos>"],
                            [0, 0, 1, 1, 1, 2, 2])
    assert not items[1].valid and items[1].year is None


def test_lines_beyond_n_keep_their_overflow_rank(hand_tok):
    pieces = ["x", "\n"] * 22 + ["x", "<eos>"]
    expected = [k for k in range(22) for _ in range(2)] + [22, 22]
    _, items = assert_ranks(hand_tok, pieces, expected)
    assert len(items) == 23 and max(expected) == 22  # ranks 20, 21, 22 are overflow for N = 20


def test_completion_cut_before_eos(hand_tok):
    assert_ranks(hand_tok, ["Heat", "\n", "Alien", " ("], [0, 0, 1, 1])
    assert_ranks(hand_tok, ["x", "<0x0A>", "Am", "<0xC3>"], [0, 0, 1, 1])  # cut inside "é"


def test_byte_fallback_pieces(hand_tok):
    text, _ = assert_ranks(hand_tok, ["Am", "<0xC3>", "<0xA9>", "lie", "<0x0A>", "<0xC3>", "<0xA9>", "<eos>"],
                           [0, 0, 0, 0, 0, 1, 1, 1])
    assert text == "Amélie\né"
    # "<0xA9>" holds only the second half of "é": its first character is that "é" (offset 2).
    assert token_char_starts(ids_of(hand_tok, ["Am", "<0xC3>", "<0xA9>", "lie"]), hand_tok)[1] == [0, 2, 2, 3]
    # The prefix ending in "<0x0A>", "<0xC3>" decodes to "Amélie\ufffd\ufffd" and hides the newline;
    # the running maximum keeps the offset found one token earlier.
    assert token_char_starts(ids_of(hand_tok, ["Am", "<0xC3>", "<0xA9>", "lie", "<0x0A>", "<0xC3>", "<0xA9>"]),
                             hand_tok)[1] == [0, 2, 2, 3, 6, 7, 7]


def test_padding_and_prompt_positions_are_minus_one(hand_tok):
    eos = hand_tok.eos_token_id
    ids = torch.tensor([ids_of(hand_tok, ["Heat", "\n", "Alien", "<eos>"]) + [eos, eos],   # pad == eos
                        [eos, eos] + ids_of(hand_tok, ["Heat", "\n\n", "Alien", "<eos>"])])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)       # from lengths
    expected = [[0, 0, 1, 1, -1, -1], [-1, -1, 0, 0, 2, 2]]
    for method in ("fast", "general", "auto"):
        assert token_ranks(ids, mask, hand_tok, method=method).tolist() == expected


def test_context_dependent_decoder_falls_back_to_the_general_path(ctc_tok):
    assert not fast_path_is_exact(ctc_tok)
    ids = torch.tensor([ids_of(ctc_tok, ["Heat", "\n", "\n", "Alien"])])
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert decode_completion(ids[0], ctc_tok) == "Heat\nAlien"              # repeats merged
    assert token_ranks(ids, mask, ctc_tok, method="fast").tolist() == [[0, 0, 1, 2]]   # wrong here
    assert token_ranks(ids, mask, ctc_tok).tolist() == [[0, 0, 1, 1]]      # auto: the general path
    assert token_ranks_general(ids, mask, ctc_tok).tolist() == [[0, 0, 1, 1]]


def test_table_is_rebuilt_when_tokens_are_added():
    tok = hand_tokenizer(decoders.Fuse())
    size = len(newline_table(tok))
    tok.add_tokens(["\n\n\n"])
    table = newline_table(tok)
    assert len(table) == size + 1 and table[-1] == 3 and fast_path_is_exact(tok)


def test_bad_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="same"):
        token_ranks(ids, torch.ones(2, 4), None)
    with pytest.raises(ValueError, match="method"):
        token_ranks(ids, torch.ones(2, 3), None, method="quick")


# ---------------------------------------------------------------------------------------
# Byte-level BPE and the property test
# ---------------------------------------------------------------------------------------

def test_trained_bpe_has_the_interesting_merges(bpe_tok):
    texts = [bpe_tok.decode([i]) for i in range(len(bpe_tok))]
    assert any(t.endswith(")\n") for t in texts)
    assert any("\n\n" in t for t in texts)
    assert any("\n" in t[:-1] and not t.startswith("\n") for t in texts)  # "\n" in the middle
    assert fast_path_is_exact(bpe_tok)


def splits_a_character(token_bytes):
    """The token holds part of a multi-byte character (alone it is not valid UTF-8)."""
    return token_bytes.decode("utf-8", errors="ignore") != token_bytes.decode("utf-8", errors="replace")


def byte_offsets_to_chars(token_bytes):
    """First-character offsets by byte accounting, independent of the tokenizer's decoding:
    the character that holds each token's first byte (a cut character at the end decodes to one
    U+FFFD, as in the tokenizer)."""
    data = b"".join(token_bytes)
    starts, offset = [], 0
    for piece in token_bytes:
        starts.append(len(data[:offset].decode("utf-8", errors="ignore")))
        offset += len(piece)
    return data.decode("utf-8", errors="replace"), starts


def random_batch(tok, n_rows, seed):
    rng = random.Random(seed)
    rows, cut = [], []
    for _ in range(n_rows):
        ids = tok.encode(random_completion(rng, WORDS + RARE), add_special_tokens=False)
        if rng.random() < 0.2:  # cut before <eos>, anywhere (also inside a character)
            ids = ids[:rng.randint(1, len(ids))]
            cut.append(True)
        else:
            ids = ids + [tok.eos_token_id]
            cut.append(False)
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.full((n_rows, width), tok.eos_token_id)  # pad == eos on purpose
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = True
    return ids, mask, cut


def test_fast_equals_general_equals_parse_spans_on_random_completions(bpe_tok):
    ids, mask, cut = random_batch(bpe_tok, 1000, seed=99)
    fast = token_ranks(ids, mask, bpe_tok, method="fast")
    general = token_ranks(ids, mask, bpe_tok, method="general")
    assert torch.equal(fast, general)
    assert torch.equal(token_ranks(ids, mask, bpe_tok), fast)
    assert torch.equal(fast == -1, ~mask)

    byte_of = gpt2_byte_decoder()
    special = set(bpe_tok.all_special_ids)
    split_chars = overflow_rows = blank_rows = 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]].tolist()
        token_bytes = [b"" if i in special else bytes(byte_of[c] for c in bpe_tok.convert_ids_to_tokens(i))
                       for i in row]
        text, byte_starts = byte_offsets_to_chars(token_bytes)
        decoded, starts = token_char_starts(row, bpe_tok)
        assert decoded == text == decode_completion(row, bpe_tok)
        if "\ufffd" not in text:  # valid UTF-8: the offsets are exact (see the module docstring)
            assert starts == byte_starts
            split_chars += sum(1 for tb in token_bytes if splits_a_character(tb))
        items = parse_recommendations(text)
        assert ranks_from_spans(items, byte_starts) == ranks_from_spans(items, starts) == fast[b][mask[b]].tolist()
        overflow_rows += len(items) > 20
        blank_rows += any(it.title == "" for it in items[:-1])
    # The random cases did cover the hard parts.
    assert split_chars > 50 and overflow_rows > 50 and blank_rows > 50 and sum(cut) > 100
