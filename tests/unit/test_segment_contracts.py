"""The documented edges of rankgrpo.segment that the main tests leave open: the common prefix of a
decoding cut inside a character, spaces before punctuation kept, ids outside the newline table, the
fast-path check's probes and cache, and method="general" on a tokenizer whose fast path is wrong.
Found by mutation testing (docs/testing.md, "Mutation score")."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from rankgrpo import segment
from rankgrpo.parsing import parse_recommendations
from rankgrpo.segment import (decode_completion, fast_path_is_exact, newline_table, ranks_from_spans,
                              token_char_starts, token_ranks, token_ranks_fast)

SPECIAL = ["<eos>", "<pad>", "<unk>", "<bos>"]


def word_tokenizer(pieces, decoder, **kwargs):
    """Exact token boundaries: a word-level vocabulary of ``pieces``; encode() puts <bos> first."""
    vocab = {p: i for i, p in enumerate(SPECIAL + pieces)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoder
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", **kwargs)


@pytest.fixture(scope="module")
def big_fallback_tok():
    """Byte fallback in a 4,000-word vocabulary: the lone bytes <0xC3> and <0xA9> hide a following
    <0x0A>, and random probes almost never put one right before it, so only the probes built from
    the unfinished tokens catch that the fast path is wrong here."""
    return word_tokenizer(["\n", "<0x0A>", "<0xC3>", "<0xA9>"] + [f"w{i}" for i in range(4000)],
                          decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]))


def ids(tok, pieces):
    vocab = tok.get_vocab()
    return [vocab[p] for p in pieces]


@pytest.mark.parametrize("prefix,text,expected", [
    ("", "Heat", 0),
    ("Heat", "Heat (1995)", 4),
    ("Alien", "Heat", 0),
    ("Am\ufffd", "Amélie", 2),                      # the decoding stops inside "é"
    ("a\ufffd\ufffd\ufffd", "a東京", 1),            # a run of cut bytes: three U+FFFD
    ("Heat (1995)\n\ufffd", "Heat (1995)\n東京", 12),
])
def test_common_prefix_length(prefix, text, expected):
    assert segment._common_prefix_length(prefix, text) == expected


def test_spaces_before_punctuation_are_kept():
    # a tokenizer that cleans up spaces by default ("Heat ," -> "Heat,"): the completion text and the
    # offsets must be those of the tokens' own text
    tok = word_tokenizer(["Heat", " ,", " .", "\n", "Alien"], decoders.Fuse(), clean_up_tokenization_spaces=True)
    row = ids(tok, ["Heat", " ,", "\n", "Alien", " ."])
    assert tok.decode(row) == "Heat,\nAlien."                    # what the default would give
    assert decode_completion(row, tok) == "Heat ,\nAlien ."
    assert token_char_starts(row, tok) == ("Heat ,\nAlien .", [0, 4, 6, 7, 12])


def test_ids_outside_the_newline_table_count_zero():
    newlines = torch.tensor([1, 0, 2])       # id 0 "\n", id 1 "x", id 2 "\n\n"
    # a masked-out prompt "\n", the ignore index -100, and id 3 past the table all count 0
    row = torch.tensor([[0, -100, 0, 1, 3, 2, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # counts [0, 0, 1, 0, 0, 2, 1] -> newlines before each token [0, 0, 0, 1, 1, 1, 3]
    assert token_ranks_fast(row, mask, newlines).tolist() == [[-1, 0, 0, 1, 1, 1, 3]]


def test_ranks_from_spans_rejects_an_offset_past_the_text():
    items = parse_recommendations("Heat\nAlien")   # spans [0, 4] and [5, 10]
    assert ranks_from_spans(items, [0, 4, 5, 10]) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="character 11 lies in no item span"):
        ranks_from_spans(items, [11])


def test_the_probes_of_the_fast_path_check(big_fallback_tok):
    tok = big_fallback_tok
    texts = segment._decode_vocabulary(tok)
    newlines = segment._newline_counts(texts, tok)
    newline_ids, unfinished = ids(tok, ["\n", "<0x0A>"]), ids(tok, ["<0xC3>", "<0xA9>"])
    assert torch.nonzero(newlines).flatten().tolist() == newline_ids
    probes = segment._probe_sequences(tok, newlines, unfinished)
    assert probes == segment._probe_sequences(tok, newlines, unfinished)    # the same verdict every time
    assert probes[0] == tok.encode(segment._PROBE_TEXT, add_special_tokens=False)
    assert probes[1] == newline_ids                                         # back to back
    assert all(0 < len(p) <= 64 for p in probes)
    # after the probe text: the k = 2 newline ids, each between random neighbours (3k), each after an
    # unfinished token (2k), each of the u = 2 unfinished tokens around a newline token (3u), then
    # 8 chunks of 64 random ids and the 4 special ids
    k, u = 2, 2
    assert sum(map(len, probes[1:])) == k + 3 * k + 2 * k + 3 * u + 8 * 64 + len(SPECIAL)
    pairs = {(a, b) for p in probes for a, b in zip(p, p[1:])}
    assert all(any((x, nl) in pairs for x in unfinished) for nl in newline_ids)


def test_only_the_unfinished_probes_catch_byte_fallback(big_fallback_tok):
    tok = big_fallback_tok
    assert not fast_path_is_exact(tok)
    newlines = newline_table(tok)
    assert segment._fast_path_agrees(tok, newlines, [])          # without them the check would pass
    row = torch.tensor([ids(tok, ["w1", "<0xC3>", "<0x0A>", "w2"])])
    mask = torch.ones_like(row, dtype=torch.bool)
    assert decode_completion(row[0], tok) == "w1\ufffd\ufffdw2"              # one line
    assert token_ranks(row, mask, tok, method="fast").tolist() == [[0, 0, 0, 1]]   # wrong here
    for method in ("auto", "general"):
        assert token_ranks(row, mask, tok, method=method).tolist() == [[0, 0, 0, 0]]


def test_tables_are_built_once_per_tokenizer():
    tok = word_tokenizer(["Heat", "\n"], decoders.Fuse())
    table = newline_table(tok)
    assert newline_table(tok) is table and fast_path_is_exact(tok)
    assert table.tolist() == [0, 0, 0, 0, 0, 1]
