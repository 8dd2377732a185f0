"""Token -> rank ids, by the rule of the one parse.

``rankgrpo.parsing.parse_recommendations`` makes line k of the completion text rank k
(0-based). This module gives every completion token the rank of the line it starts in:

    rank(t) = number of "\\n" characters in the completion text before token t's first character.

So a newline closes its own line (")\\n" is the last token of its rank), a "\\n\\n" token
leaves a blank line with no tokens of its own, ``<eos>`` belongs to the last line, and
lines past N-1 keep their own index (20, 21, ...: overflow). Tokens outside the completion
mask (prompt, padding) get -1.

**The completion text** is ``decode_completion(ids, tokenizer)``: the tokenizer's decoding
of the masked completion ids with special tokens dropped and no clean-up of spaces. Rewards
must parse this same text so that rank k's reward and rank k's tokens are the same line.

**The first character of a token** is the first character of the completion text that the
tokens before it have not already written. Its offset (``token_char_starts``) is the length
of the longest common prefix of the text and the decoding of the tokens before t, or that of
an earlier token if larger (offsets never go back). A decoding that stops inside a multi-byte
character shows U+FFFD there, so for a byte-level token holding the tail of "é" the first
character is that "é", which an earlier token started; in valid UTF-8 this is the character
holding the token's first byte. A token that writes no text (``<eos>`` and
other special tokens) sits where its text would go, after everything before it; ``<eos>`` at
the end is at ``len(text)``, the end of the last line. Next to an invalid or cut byte sequence,
which shows as U+FFFD in the text itself, decoded text cannot tell whether a token's first
byte belongs to that U+FFFD or to the next character; either way the rank is the same,
because "\\n" is one byte and never part of such a sequence.

Two paths compute the same thing:

* ``token_ranks_general``: decodes growing prefixes of each completion and measures each
  token's first character against the full text (the definition, written out; any tokenizer).
* ``token_ranks_fast``: a per-vocabulary table of newline counts and an exclusive cumulative
  sum (vectorised, no decoding). It is exact when a token's newline count does not depend on
  its neighbours, which holds by construction for byte-level BPE (GPT-2, Llama-3, Qwen).
  ``fast_path_is_exact`` checks it per tokenizer on probe sequences against the general path;
  ``token_ranks`` uses the fast path only when it passes (byte-fallback SentencePiece
  tokenizers fail it, see there, and take the general path).

The authors' code instead calls ``tok.decode([id])`` once per token in a Python loop and
counts newlines (``_segment_items_from_tokens``); ``benchmarks/bench_segment.py`` times the three.
"""
from __future__ import annotations

import random
import weakref
from bisect import bisect_right
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch

from rankgrpo.parsing import Item

# Hard cases for the fast-path check: blank lines, CRLF, accents, CJK, an emoji, a trailing "\n".
_PROBE_TEXT = (
    'Heat (1995)\n\nAmélie (2001)\n  - "Léon: The Professional" (1994)\r\n'
    "東京物語 (1953)\n\n\n🎬 Cœur (2020)\nno year here\n1. **Alien (1979)**\n\n"
)
_PROBE_CHUNK = 64
_N_RANDOM_PROBES = 8

# tokenizer -> (len(tokenizer), newline table, fast path exact?)
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------
# Decoding and character offsets (the definition)
# ---------------------------------------------------------------------------------------

def decode_completion(ids: Sequence[int], tokenizer) -> str:
    """The completion text that the parse and the segmentation share.

    Special tokens are dropped (they hold no text of the list) and spaces are not cleaned up,
    so character offsets are those of the tokens' own text.
    """
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _decode_prefixes(ids: list[int], tokenizer) -> list[str]:
    """decode(ids[:t]) for t = 0 .. len(ids) - 1 (numpy views: no Python-level copy of each prefix)."""
    if not ids:
        return []
    array = np.asarray(ids, dtype=np.int64)
    return tokenizer.batch_decode(
        [array[:t] for t in range(len(ids))], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def _common_prefix_length(prefix: str, text: str) -> int:
    """Length of the longest common prefix of ``prefix`` and ``text``.

    Usually ``prefix`` is a prefix of ``text``. It is not when the decoded prefix ends inside
    a multi-byte character, which then shows as U+FFFD; the common part stops at that
    character, which is where the next token's first character begins.
    """
    if text.startswith(prefix):
        return len(prefix)
    lo, hi = 0, min(len(prefix), len(text))
    while lo < hi:  # largest L with text.startswith(prefix[:L]); that predicate is monotone in L
        mid = (lo + hi + 1) // 2
        if text.startswith(prefix[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def token_char_starts(ids: Sequence[int], tokenizer) -> tuple[str, list[int]]:
    """The completion text and each token's first-character offset in it (module docstring).

    ids: one completion's token ids (already cut to its mask).
    Returns ``(text, starts)`` with ``starts[t]`` in ``[0, len(text)]``, non-decreasing;
    ``len(text)`` for a token (such as ``<eos>``) that writes nothing after the last character.
    The running maximum matters for decoders that turn a whole unfinished run of byte pieces
    into U+FFFD (byte fallback): a prefix ending inside a character can then hide a "\\n" that an
    earlier, shorter prefix showed.
    Cost: one decode per prefix, O(T^2) in total; this is the reference, not the fast path.
    """
    ids = list(ids)
    text = decode_completion(ids, tokenizer)
    starts = [_common_prefix_length(p, text) for p in _decode_prefixes(ids, tokenizer)]
    return text, list(accumulate(starts, max))


def ranks_from_spans(items: Sequence[Item], char_starts: Sequence[int]) -> list[int]:
    """Token ranks read off the parse's character spans.

    A token's rank is the rank of the item whose span ``[start, end]`` contains the token's
    first character, ``end`` inclusive: ``end`` is the position of the "\\n" that closes the
    line (or ``len(text)`` for the last line, where ``<eos>`` sits).

    >>> from rankgrpo.parsing import parse_recommendations
    >>> items = parse_recommendations("Heat (1995)\\n\\nAlien")   # lines: 0-11, 12-12, 13-18
    >>> ranks_from_spans(items, [0, 4, 11, 13, 18])             # "Heat", " (1995)", "\\n\\n", "Alien", <eos>
    [0, 0, 0, 2, 2]
    """
    starts = [it.start for it in items]
    ranks = []
    for start in char_starts:
        k = bisect_right(starts, start) - 1
        if k < 0 or start > items[k].end:
            raise ValueError(f"character {start} lies in no item span")
        ranks.append(items[k].rank)
    return ranks


def _row_ranks_general(ids: list[int], tokenizer) -> list[int]:
    text, starts = token_char_starts(ids, tokenizer)
    newlines_before = [0, *accumulate(ch == "\n" for ch in text)]  # newlines_before[i] = text[:i].count("\n")
    return [newlines_before[s] for s in starts]


def token_ranks_general(completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """Rank id of each completion token through the tokenizer's decoding (any tokenizer).

    completion_ids, completion_mask: [B, T]; the masked tokens of a row, in order, are its
    completion. Returns LongTensor [B, T]: the line index (overflow lines keep theirs), -1
    outside the mask.
    """
    mask = completion_mask.bool()
    ranks = torch.full(completion_ids.shape, -1, dtype=torch.long)
    for b in range(completion_ids.shape[0]):
        row_ids = completion_ids[b][mask[b]].tolist()
        ranks[b, mask[b].cpu()] = torch.tensor(_row_ranks_general(row_ids, tokenizer), dtype=torch.long)
    return ranks.to(completion_ids.device)


# ---------------------------------------------------------------------------------------
# Fast path: a newline count per vocabulary entry
# ---------------------------------------------------------------------------------------

def token_ranks_fast(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     newlines: torch.Tensor) -> torch.Tensor:
    """Rank ids from a per-token newline table: an exclusive cumulative sum over the mask.

    completion_ids, completion_mask: [B, T]; newlines: [V], the number of "\\n" each token id
    decodes to (0 for special tokens; ids outside the table count 0, as decoding skips them).
    Returns LongTensor [B, T] with -1 outside the mask. Exact when the newline counts of the
    tokens add up to that of their decoding (see ``fast_path_is_exact``).

    Example: ids 0 "<eos>", 1 "Heat", 2 " (1995", 3 ")\\n", 4 "\\n\\n"; text "Heat (1995)\\nHeat\\n\\nHeat".

    >>> newlines = torch.tensor([0, 0, 0, 1, 2])
    >>> ids = torch.tensor([[1, 2, 3, 1, 4, 1, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])            # the last 0 is padding
    >>> token_ranks_fast(ids, mask, newlines)
    tensor([[ 0,  0,  0,  1,  1,  3,  3, -1]])
    """
    mask = completion_mask.bool()
    ids = completion_ids.long()
    newlines = newlines.to(ids.device)
    in_table = (ids >= 0) & (ids < newlines.numel())
    counts = torch.where(mask & in_table, newlines[ids.clamp(0, newlines.numel() - 1)], 0)
    newlines_before = counts.cumsum(dim=1) - counts
    return torch.where(mask, newlines_before, -1)


def _special_ids(tokenizer) -> list[int]:
    return [i for i in tokenizer.all_special_ids if i is not None]


def _decode_vocabulary(tokenizer) -> list[str]:
    """Each token id decoded on its own (special tokens give "")."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False,  # pragma: no mutate (keeps every "\n" and U+FFFD)
                                  )


def _newline_counts(texts: list[str], tokenizer) -> torch.Tensor:
    newlines = torch.tensor([t.count("\n") for t in texts], dtype=torch.long)
    newlines[_special_ids(tokenizer)] = 0
    return newlines


def _probe_sequences(tokenizer, newlines: torch.Tensor, unfinished: list[int], seed: int = 0) -> list[list[int]]:
    """Id sequences on which the fast path must agree with the general path.

    The probe text encoded by the tokenizer; every newline-holding token back to back (catches
    decoders that merge or drop repeated newlines), each between random neighbours, and each
    right after a token that leaves a character unfinished (catches decoders that swallow a
    newline into U+FFFD, as byte fallback does for the run "<0xC3>", "<0x0A>"), and every such
    token before a newline token; random ids from the whole vocabulary with the special tokens.
    """
    rng = random.Random(seed)
    vocab_size = len(newlines)
    newline_ids = torch.nonzero(newlines).flatten().tolist()
    interleaved = [i for nl in newline_ids for i in (rng.randrange(vocab_size), nl, rng.randrange(vocab_size))]
    after_unfinished = []
    if newline_ids and unfinished:
        after_unfinished = [i for nl in newline_ids for i in (rng.choice(unfinished), nl)]
        after_unfinished += [i for u in unfinished for i in (u, rng.choice(newline_ids), u)]
    random_ids = [rng.randrange(vocab_size) for _ in range(_N_RANDOM_PROBES * _PROBE_CHUNK)]
    random_ids += _special_ids(tokenizer)
    rng.shuffle(random_ids)
    sequences = [list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))]
    for ids in (newline_ids, interleaved, after_unfinished, random_ids):
        sequences += [ids[i:i + _PROBE_CHUNK] for i in range(0, len(ids), _PROBE_CHUNK)]
    return [s for s in sequences if s]


def _fast_path_agrees(tokenizer, newlines: torch.Tensor, unfinished: list[int]) -> bool:
    for ids in _probe_sequences(tokenizer, newlines, unfinished):
        row = torch.tensor([ids])
        mask = torch.ones_like(row, dtype=torch.bool)
        if not torch.equal(token_ranks_fast(row, mask, newlines), token_ranks_general(row, mask, tokenizer)):
            return False
    return True


def _tokenizer_tables(tokenizer) -> tuple[torch.Tensor, bool]:
    cached = _TABLES.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):  # rebuilt when tokens were added
        texts = _decode_vocabulary(tokenizer)
        newlines = _newline_counts(texts, tokenizer)
        unfinished = [i for i, t in enumerate(texts) if "\ufffd" in t]  # e.g. a lone UTF-8 lead byte
        cached = (len(tokenizer), newlines, _fast_path_agrees(tokenizer, newlines, unfinished))
        _TABLES[tokenizer] = cached
    return cached[1], cached[2]


def newline_table(tokenizer) -> torch.Tensor:
    """LongTensor [len(tokenizer)]: how many "\\n" each token id decodes to on its own
    (special tokens 0). Built once per tokenizer and cached."""
    return _tokenizer_tables(tokenizer)[0]


def fast_path_is_exact(tokenizer) -> bool:
    """Whether ``token_ranks_fast`` with ``newline_table(tokenizer)`` equals the general path.

    Checked once per tokenizer on probe sequences (``_probe_sequences``). It holds by
    construction for byte-level BPE (GPT-2, Llama-3, Qwen): every token is a fixed byte string
    and the lossy UTF-8 decoding never swallows the byte "\\n". A decoder that merges or drops
    newlines by context fails it: CTC merges repeats, and byte fallback (SentencePiece models
    such as Llama-2 or Mistral) turns the unfinished run "<0xC3>", "<0x0A>" into two U+FFFD,
    so a sampled lone lead byte can hide the next newline.
    """
    return _tokenizer_tables(tokenizer)[1]


def token_ranks(completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer, *,
                method: str = "auto") -> torch.Tensor:
    """Rank id of every completion token (see the module docstring for the rule).

    completion_ids: [B, T] sampled ids; completion_mask: [B, T], 1 on the completion tokens
    (up to and including the first ``<eos>``), built from lengths, not token values.
    method: "auto" (the fast path when ``fast_path_is_exact(tokenizer)``, else the general
    path), "fast" or "general".
    Returns LongTensor [B, T]: line index of each token (>= N for overflow lines), -1 outside
    the mask.
    """
    if method not in ("auto", "fast", "general"):
        raise ValueError(f"method must be 'auto', 'fast' or 'general', got {method!r}")
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must be the same [B, T] shape")
    if method == "general":
        return token_ranks_general(completion_ids, completion_mask, tokenizer)
    newlines, exact = _tokenizer_tables(tokenizer)
    if method == "auto" and not exact:
        return token_ranks_general(completion_ids, completion_mask, tokenizer)
    return token_ranks_fast(completion_ids, completion_mask, newlines)
