"""Line counters for the sampler's early stop (``sample(stop_after_items=...)``).

A counter keeps a per-row state tensor on the model's device and updates it from the sampled
token ids with table lookups only (no decoding, no host sync). Two counters:

* ``NewlineCounter`` -- every "\\n" closes a line, blank or not. Line k is rank k (the one
  parse), so this is the stop Rank-GRPO uses: stopping after N + 1 lines keeps the overflow
  line visible to length shaping. State: ``LongTensor [B]``.
* ``ItemLineCounter`` -- only lines that hold text count: a line counts once a "\\n" closes it
  and it holds a non-whitespace character. Blank lines (a double-spaced list) never count. It
  is what evaluation uses: a list item needs a line with text, so the count is an upper bound
  on the parsed items, and stopping after N + margin counted lines keeps at least N + margin
  minus (preamble and other non-item lines) candidates, room for the items the scoring drops
  (seen, out of catalog, repeated). State: ``LongTensor [B, 2]`` = (closed lines with text,
  the open line already has text).

Tables of ``ItemLineCounter``, per token id, from the token decoded on its own (special
tokens decode to "" and change nothing):

    newlines[v]  number of "\\n" in the token
    head[v]      text (non-whitespace) before its first "\\n" (anywhere, if it has none)
    inner[v]     lines with text strictly between two of its "\\n"
    tail[v]      text after its last "\\n"

Update for a token v: without "\\n", ``open |= head``; with one or more,
``closed += (open or head) + inner`` and ``open = tail``.

Worked example: tokens "1", ". Heat (1995)", "\\n\\n", "2", ". Alien (1979)\\nPi", "\\n"
give closed = 0, 0, 1, 1, 2, 3 -- and ``count_item_lines`` of the joined text is 3.

The tables read each token in isolation. That is exact for byte-level BPE (GPT-2, Llama-3,
Qwen); with byte fallback a lone UTF-8 lead byte decodes to U+FFFD (counted as text), so the
count can only run ahead by a line in rare cases, which the margin absorbs.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch


def count_item_lines(text: str) -> int:
    """The reference rule on text: lines closed by "\\n" that hold a non-whitespace character.

    >>> count_item_lines("Here you go:\\n\\n1. Heat (1995)\\n\\n2. Alien (1979)\\nunfinished")
    3
    """
    return sum(1 for line in text.split("\n")[:-1] if line.strip())


class NewlineCounter:
    """Closed lines = "\\n" characters emitted (``newlines: LongTensor [V]``)."""

    def __init__(self, newlines: torch.Tensor):
        self.newlines = newlines.long()

    def to(self, device) -> "NewlineCounter":
        return NewlineCounter(self.newlines.to(device))

    def start(self, n_rows: int, device) -> torch.Tensor:
        return torch.zeros(n_rows, dtype=torch.long, device=device)

    def update(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return state + self.newlines[tokens]

    @staticmethod
    def closed(state: torch.Tensor) -> torch.Tensor:
        return state


class ItemLineCounter:
    """Closed lines with text (see the module docstring). Tables: ``LongTensor [V]`` each."""

    def __init__(self, newlines: torch.Tensor, head: torch.Tensor, inner: torch.Tensor, tail: torch.Tensor):
        self.newlines, self.head, self.inner, self.tail = (t.long() for t in (newlines, head, inner, tail))

    @classmethod
    def from_texts(cls, texts: Sequence[str], vocab_size: int | None = None) -> "ItemLineCounter":
        """Tables from the decoded text of each token id (``texts[v]``), zero-padded to ``vocab_size``."""
        rows = []
        for text in texts:
            parts = text.split("\n")
            n = len(parts) - 1
            rows.append((n, int(bool(parts[0].strip())), sum(1 for p in parts[1:-1] if p.strip()),
                         int(n > 0 and bool(parts[-1].strip()))))
        tables = torch.tensor(rows, dtype=torch.long).reshape(-1, 4).T
        size = max(len(texts), vocab_size or 0)
        return cls(*torch.nn.functional.pad(tables, (0, size - len(texts))))

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> "ItemLineCounter":
        """Tables for a Hugging Face tokenizer (built once per tokenizer and cached), padded to
        max(len(tokenizer), vocab_size) for embedding rows beyond the tokenizer."""
        cached = _CACHE.get(tokenizer)
        if cached is None or cached[0] != len(tokenizer):  # rebuilt when tokens were added
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)
            cached = (len(tokenizer), cls.from_texts(texts))
            _CACHE[tokenizer] = cached
        tables = (cached[1].newlines, cached[1].head, cached[1].inner, cached[1].tail)
        size = max(len(tokenizer), vocab_size or 0)
        return cls(*(torch.nn.functional.pad(t, (0, size - len(t))) for t in tables))

    def to(self, device) -> "ItemLineCounter":
        return ItemLineCounter(*(t.to(device) for t in (self.newlines, self.head, self.inner, self.tail)))

    def start(self, n_rows: int, device) -> torch.Tensor:
        return torch.zeros(n_rows, 2, dtype=torch.long, device=device)

    def update(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """state: [B, 2], tokens: [B] -> new state [B, 2]."""
        has_newline = self.newlines[tokens] > 0
        head = self.head[tokens]
        closed, open_line = state[:, 0], state[:, 1]
        closed = closed + torch.where(has_newline, (open_line | head) + self.inner[tokens], 0)
        open_line = torch.where(has_newline, self.tail[tokens], open_line | head)
        return torch.stack([closed, open_line], dim=-1)

    @staticmethod
    def closed(state: torch.Tensor) -> torch.Tensor:
        return state[:, 0]


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
