"""Catalog-constrained decoding: every line the sampler writes is a catalog line, none twice.

The paper's student (like every model in this field) can name films that do not exist; its
in-catalog ratio drifts during RL (Fig. 6). Since we own the sampling loop, we
can rule that out: at every step the logits of the tokens that cannot continue a catalog
line are set to -inf and the rest are renormalised.

**The trie.** Every catalog item ``Title (Year)`` is tokenised twice, as it appears inside a
completion written by ``format_recommendations`` (and as the SFT targets are written):

* the *line* variant ``Title (Year)\\n`` (a line followed by another line), and
* the *final* variant ``Title (Year)`` (the last line, followed by ``<eos>``).

Each is tokenised in context, between two other lines (``build_catalog_trie``), because BPE
may merge across a line break: with Qwen2's pre-tokenizer ``")\\n"`` is one token, so the last
token of a line variant is ``")\\n"`` and that of the final variant is ``")"``. Lines whose
tokens would change with their neighbours are dropped and counted. The token sequences go
into one prefix trie stored as flat arrays (children of a node are a contiguous, sorted run
of edges), built once per (catalog, tokenizer) and cached in memory and optionally on disk.

**The per-row state machine** (``ConstraintState``). A row is at a trie node (the root at a
line start) and has written ``lines`` complete lines. At each step it may emit:

* a child token of its node whose subtree still holds a line it may write, where an item is
  not allowed once the row has written it (no repeats) or when it is excluded for the
  conversation (e.g. a title the user mentioned); the final variant counts only once
  ``lines >= N - 1`` (it would be line N);
* ``<eos>`` right after a final variant (so only once N lines are written, and the list
  ends like ``format_recommendations``'s, without a trailing line break), or when nothing
  else is allowed (every title used: the row ends cleanly instead of deadlocking).

A row may write more than N lines (overflow, as without the constraint; the loss penalises
it); it ends the list by choosing a final variant.

Reaching the end of a line variant marks its item as used and returns to the root.

Example (catalog {Heat 1995, Alien 1979}, N = 2, tokens "Heat", " (", "1", "9", "5", ")\\n", ")"):
at the root {"Heat", "Alien"} are allowed; after "Heat (1995)\\n" (lines = 1) only "Alien"
remains, and at its end both ")\\n" and ")" are allowed; after ")" only ``<eos>``; after
")\\n" (lines = 2) nothing is left, so ``<eos>`` is forced.

**Exact log-probs.** The sampler records log softmax over the allowed set (the masked,
renormalised distribution). ``constrained_logprobs`` recomputes that value from teacher-forced
logits by replaying the same state machine over the completion and computing only the
normaliser over the allowed ids of each position (gathered, never a dense [B, T, V] mask), so
the importance ratio of a freshly sampled batch is 1 up to float rounding.
"""
from __future__ import annotations

import hashlib
import io
import weakref
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rankgrpo.catalog import Catalog

CACHE_FORMAT = 1
# A context line around the line being tokenised (any ordinary line works; it is cut off again).
_ANCHOR = "Heat (1995)"


# --------------------------------------------------------------------------------------
# The trie
# --------------------------------------------------------------------------------------


@dataclass
class CatalogTrie:
    """The token sequences of every catalog line as a prefix trie in flat arrays.

    Node 0 is the root (a line start). For S nodes, E edges and I catalog items:
        edge_start   int64 [S + 1]  the edges out of node u are edge_start[u] : edge_start[u + 1]
        edge_token   int64 [E]      token id of each edge (sorted within a node)
        edge_child   int32 [E]      node each edge leads to
        edge_key     int64 [E]      parent * key_stride + token, sorted: lookup by searchsorted
        parent       int32 [S]      parent node (-1 for the root)
        parent_edge  int32 [S]      the edge into the node (-1 for the root)
        n_line       int32 [S]      items whose line variant ("...)\\n") passes through the node
        n_any        int32 [S]      items with either variant passing through the node
        line_item    int32 [S]      item whose line variant ends at the node, else -1
        final_item   int32 [S]      item whose final variant (before <eos>) ends there, else -1
        item_line_end, item_final_end  int32 [I]  end nodes of each item's variants (-1: dropped)
    dropped: Counter of reasons for catalog items left out (each is also -1 above).
    first_line_mismatch: items whose line tokenises differently at the very start of a
        completion than after a line break (kept; 0 for byte-level BPE such as Qwen2's).
    """

    edge_start: np.ndarray
    edge_token: np.ndarray
    edge_child: np.ndarray
    edge_key: np.ndarray
    parent: np.ndarray
    parent_edge: np.ndarray
    n_line: np.ndarray
    n_any: np.ndarray
    line_item: np.ndarray
    final_item: np.ndarray
    item_line_end: np.ndarray
    item_final_end: np.ndarray
    key_stride: int
    dropped: Counter = field(default_factory=Counter)
    first_line_mismatch: int = 0

    _ARRAYS = ("edge_start", "edge_token", "edge_child", "edge_key", "parent", "parent_edge", "n_line", "n_any",
               "line_item", "final_item", "item_line_end", "item_final_end")

    def __post_init__(self):
        self.edge_has_line = self.n_line[self.edge_child] > 0  # bool [E]: leads to some line variant
        self.edge_has_any = self.n_any[self.edge_child] > 0    # bool [E]: leads to some item at all

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def num_items(self) -> int:
        return len(self.item_line_end)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (what a trie costs at run time)."""
        flags = self.edge_has_line.nbytes + self.edge_has_any.nbytes
        return sum(getattr(self, a).nbytes for a in self._ARRAYS) + flags

    def children(self, node: int) -> dict[int, int]:
        """{token: child node} of one node (for inspection and tests)."""
        lo, hi = self.edge_start[node], self.edge_start[node + 1]
        return dict(zip(self.edge_token[lo:hi].tolist(), self.edge_child[lo:hi].tolist()))

    def path(self, node: int) -> list[int]:
        """Nodes from `node` up to the root, both included."""
        out = []
        while node >= 0:
            out.append(node)
            node = int(self.parent[node])
        return out

    def item_tokens(self, item: int, final: bool = False) -> list[int]:
        """The token ids of item `item`'s line variant (or final variant) read back from the trie."""
        node = int((self.item_final_end if final else self.item_line_end)[item])
        if node < 0:
            raise KeyError(f"catalog item {item} is not in the trie ({dict(self.dropped)})")
        return [int(self.edge_token[self.parent_edge[u]]) for u in reversed(self.path(node)[:-1])]

    # ---------------------------------------------------------------- disk format
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = np.array([CACHE_FORMAT, self.key_stride, self.first_line_mismatch], dtype=np.int64)
        dropped = np.array([f"{k}\t{v}" for k, v in self.dropped.items()], dtype=np.str_)
        np.savez(buf, meta=meta, dropped=dropped, **{a: getattr(self, a) for a in self._ARRAYS})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CatalogTrie":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = z["meta"].tolist()
            if meta[0] != CACHE_FORMAT:
                raise ValueError(f"trie cache format {meta[0]} != {CACHE_FORMAT}")
            dropped = Counter({k: int(v) for k, v in (s.split("\t") for s in z["dropped"].tolist())})
            return cls(**{a: z[a] for a in cls._ARRAYS}, key_stride=int(meta[1]), dropped=dropped,
                       first_line_mismatch=int(meta[2]))


def catalog_lines(catalog: Catalog) -> list[str]:
    """Each item as a completion writes it: "Title (Year)" (``parsing.format_recommendations``)."""
    return [f"{it.title} ({it.year})" for it in catalog]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (through the Rust tokenizer when there is one:
    the same ids as ``tokenizer(texts)``, without building Python encodings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return [e.ids for e in fast(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def line_token_sequences(lines: Sequence[str], tokenizer) -> tuple[list, list, Counter, int]:
    """Tokenise each line in context: (line variants, final variants, dropped reasons, first-line mismatches).

    line variant  = tokens of "L\\n" inside  A + "\\n" + L + "\\n" + A   (A = an ordinary line)
    final variant = tokens of "L"    at the end of   A + "\\n" + L        (<eos> follows)
    Either is None (and counted in `dropped`) when the context's tokens do not split cleanly
    at the line's boundaries, i.e. when the line's tokens depend on its neighbours.
    """
    head = _encode(tokenizer, [_ANCHOR + "\n"])[0]
    tail = _encode(tokenizer, [_ANCHOR])[0]
    fulls = _encode(tokenizer, [f"{_ANCHOR}\n{line}\n{_ANCHOR}" for line in lines])
    finals = _encode(tokenizer, [f"{_ANCHOR}\n{line}" for line in lines])
    starts = _encode(tokenizer, [f"{line}\n{_ANCHOR}" for line in lines])
    line_seqs, final_seqs, dropped, mismatch = [], [], Counter(), 0
    for line, full, fin, start in zip(lines, fulls, finals, starts):
        seq = full[len(head):len(full) - len(tail)]
        ok = full[:len(head)] == head and full[len(full) - len(tail):] == tail and len(seq) > 0
        ok = ok and fin[:len(head)] == head and len(fin) > len(head)
        if "\n" in line or "\r" in line:
            dropped["line break in the title"] += 1
        elif not ok:
            dropped["tokens depend on the neighbouring lines"] += 1
        else:
            line_seqs.append(seq)
            final_seqs.append(fin[len(head):])
            mismatch += start[:len(start) - len(tail)] != seq
            continue
        line_seqs.append(None)
        final_seqs.append(None)
    return line_seqs, final_seqs, dropped, mismatch


def build_catalog_trie(catalog: Catalog, tokenizer) -> CatalogTrie:
    """Build the trie of every catalog line (see the module docstring). Cost: one batched
    tokenisation of 3 strings per item and one insertion of 2 sequences per item."""
    line_seqs, final_seqs, dropped, mismatch = line_token_sequences(catalog_lines(catalog), tokenizer)
    children: list[dict[int, int]] = [{}]
    line_item, final_item = [-1], [-1]
    n_items = len(line_seqs)
    ends = np.full((2, n_items), -1, dtype=np.int64)

    def insert(seq):
        node = 0
        for tok in seq:
            nxt = children[node].get(tok)
            if nxt is None:
                nxt = len(children)
                children[node][tok] = nxt
                children.append({})
                line_item.append(-1)
                final_item.append(-1)
            node = nxt
        return node

    for i, (seq, fin) in enumerate(zip(line_seqs, final_seqs)):
        if seq is None:
            continue
        a, b = insert(seq), insert(fin)
        if line_item[a] >= 0 or final_item[b] >= 0 or children[a]:
            dropped["same tokens as another item"] += 1  # cannot happen after the catalog's de-duplication
            continue
        line_item[a], final_item[b] = i, i
        ends[:, i] = a, b
    # A line end that later got children would mean a line is a prefix of another: impossible,
    # since only a line break ends a line variant and titles hold none.
    assert all(not children[u] for u in range(len(children)) if line_item[u] >= 0)

    # Flat arrays: the edges out of each node as one contiguous run, sorted by token.
    parents, tokens, childs = [], [], []
    for u, ch in enumerate(children):
        for tok in sorted(ch):
            parents.append(u)
            tokens.append(tok)
            childs.append(ch[tok])
    S = len(children)
    parents = np.asarray(parents, dtype=np.int64)
    edge_token = np.asarray(tokens, dtype=np.int64)
    edge_child = np.asarray(childs, dtype=np.int32)
    edge_start = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=S))]).astype(np.int64)
    parent = np.full(S, -1, dtype=np.int32)
    parent[edge_child] = parents
    parent_edge = np.full(S, -1, dtype=np.int32)
    parent_edge[edge_child] = np.arange(len(edge_child), dtype=np.int32)
    key_stride = max(len(tokenizer), int(edge_token.max()) + 1 if len(edge_token) else 1)

    # Items per subtree: walk each kept item's two paths up to the root.
    def path(node):
        out = []
        while node >= 0:
            out.append(node)
            node = int(parent[node])
        return out

    line_nodes, any_nodes = [], []
    for i in np.flatnonzero(ends[0] >= 0).tolist():
        a = path(int(ends[0, i]))
        line_nodes += a
        any_nodes += set(a).union(path(int(ends[1, i])))
    n_line = np.bincount(np.asarray(line_nodes, dtype=np.int64), minlength=S).astype(np.int32)
    n_any = np.bincount(np.asarray(any_nodes, dtype=np.int64), minlength=S).astype(np.int32)
    return CatalogTrie(edge_start, edge_token, edge_child, parents * key_stride + edge_token, parent, parent_edge,
                       n_line, n_any, np.asarray(line_item, dtype=np.int32), np.asarray(final_item, dtype=np.int32),
                       ends[0].astype(np.int32), ends[1].astype(np.int32), key_stride, dropped, int(mismatch))


def _catalog_digest(catalog: Catalog) -> str:
    return hashlib.sha256("\n".join(catalog_lines(catalog)).encode("utf-8")).hexdigest()


_TOKENIZER_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tokenizer_digest(tokenizer) -> str:
    """What the token ids of a text depend on: the fast tokenizer's full definition (or the
    vocabulary). Computed once per tokenizer object (and again if tokens are added)."""
    cached = _TOKENIZER_DIGESTS.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        cached = (len(tokenizer), _hash_tokenizer(tokenizer))
        _TOKENIZER_DIGESTS[tokenizer] = cached
    return cached[1]


def _hash_tokenizer(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{len(tokenizer)}\n{text}".encode("utf-8")).hexdigest()


_MEMORY: dict[str, CatalogTrie] = {}


def catalog_trie(catalog: Catalog, tokenizer, cache_dir: str | Path | None = None) -> CatalogTrie:
    """The trie of (catalog, tokenizer), built once: kept in memory by content hash, and in
    ``cache_dir/catalog-trie-<catalog hash>-<tokenizer hash>.npz`` when `cache_dir` is given."""
    key = f"{_catalog_digest(catalog)[:16]}-{_tokenizer_digest(tokenizer)[:16]}"
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cache_dir) / f"catalog-trie-{key}.npz" if cache_dir else None
    trie = None
    if path is not None and path.is_file():
        try:
            trie = CatalogTrie.from_bytes(path.read_bytes())
        except (ValueError, KeyError, IndexError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
            # an old or damaged cache file (empty, truncated, another format) is rebuilt and replaced
            trie = None
    if trie is None:
        trie = build_catalog_trie(catalog, tokenizer)
        if path is not None:
            from rankgrpo.io import atomic_write_bytes

            atomic_write_bytes(path, trie.to_bytes())
    _MEMORY[key] = trie
    return trie


def seen_items(catalog: Catalog, seen_titles: Sequence[str]) -> frozenset[int]:
    """Catalog items (all years) whose normalised title is one the user mentioned."""
    return frozenset(i for t in seen_titles for i in catalog.indices_of_title(t))


def constraint_for_examples(trie: CatalogTrie, catalog: Catalog, examples, *, n_items: int,
                            eos_token_ids: Sequence[int], exclude_seen: bool = True) -> "CatalogConstraint":
    """A constraint with one exclusion set per example: the items whose title the user
    mentioned (``seen_items``) when `exclude_seen`, else none (only repeats are forbidden).

    The scripts call it once per batch of prompts (``train_rankgrpo.py``) or per split
    (``evaluate.py``, then ``for_rows`` picks each prompt's example)."""
    excluded = tuple(seen_items(catalog, ex.seen_titles) for ex in examples) if exclude_seen else None
    return CatalogConstraint(trie, n_items, tuple(eos_token_ids), excluded)


# --------------------------------------------------------------------------------------
# The constraint and its per-row state
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogConstraint:
    """What ``sample(..., constraint=)`` and ``token_logprobs(..., constraint=)`` take.

    trie:          the catalog's trie under the model's tokenizer (``catalog_trie``).
    n_items:       N; ``<eos>`` is allowed once N lines are written.
    eos_token_ids: the ids that end a completion.
    excluded:      per group, catalog item ids the rows of that group may not write (e.g.
                   ``seen_items``); None = none. For ``sample`` a group is a prompt (length P);
                   for ``token_logprobs`` a row (length B): see ``for_rows``.
    """

    trie: CatalogTrie
    n_items: int
    eos_token_ids: tuple[int, ...]
    excluded: tuple[frozenset[int], ...] | None = None

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError("n_items must be >= 1")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids is empty")
        if self.excluded is not None:
            object.__setattr__(self, "excluded", tuple(frozenset(int(i) for i in e) for e in self.excluded))

    def num_groups(self) -> int | None:
        return None if self.excluded is None else len(self.excluded)

    def for_rows(self, groups: Sequence[int] | torch.Tensor) -> "CatalogConstraint":
        """The same constraint with one exclusion set per row (row r uses group groups[r]),
        e.g. ``constraint.for_rows(rollout.prompt_index[rows])`` for ``token_logprobs``."""
        if self.excluded is None:
            return self
        groups = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
        return CatalogConstraint(self.trie, self.n_items, self.eos_token_ids, tuple(self.excluded[g] for g in groups))

    def start(self, groups: Sequence[int]) -> "ConstraintState":
        """A fresh state for rows whose exclusion sets are ``excluded[groups[r]]``."""
        return ConstraintState(self, list(groups))


class _RowBlocks:
    """One row's exclusions: the forbidden items, how many of them lie below each node
    (``used_line`` counts line variants, ``used_any`` items), and the edges whose subtree
    holds nothing else, listed under their parent node (``blocked_line`` / ``blocked_any``)."""

    __slots__ = ("forbidden", "used_line", "used_any", "blocked_line", "blocked_any")

    def __init__(self, forbidden=(), used_line=None, used_any=None, blocked_line=None, blocked_any=None):
        self.forbidden = set(forbidden)
        self.used_line = dict(used_line or {})
        self.used_any = dict(used_any or {})
        self.blocked_line = dict(blocked_line or {})  # values are tuples: a shallow copy is a full copy
        self.blocked_any = dict(blocked_any or {})

    def copy(self) -> "_RowBlocks":
        return _RowBlocks(self.forbidden, self.used_line, self.used_any, self.blocked_line, self.blocked_any)

    def forbid(self, trie: CatalogTrie, item: int) -> None:
        """Count `item` below each node of its paths; block each edge whose subtree is now exhausted."""
        if not 0 <= item < trie.num_items or item in self.forbidden or trie.item_line_end[item] < 0:
            return
        self.forbidden.add(item)
        line_path = trie.path(int(trie.item_line_end[item]))
        any_path = set(line_path).union(trie.path(int(trie.item_final_end[item])))
        for path, used, total, blocked in ((line_path, self.used_line, trie.n_line, self.blocked_line),
                                           (any_path, self.used_any, trie.n_any, self.blocked_any)):
            for u in path:
                used[u] = used.get(u, 0) + 1
                if used[u] == total[u] and u != 0:
                    p = int(trie.parent[u])
                    blocked[p] = blocked.get(p, ()) + (int(trie.parent_edge[u]),)


class ConstraintState:
    """The state machine of a batch of rows (module docstring). Arrays are indexed by row:
    node [N] trie node; lines [N] complete lines written; done [N] the row emitted <eos>;
    blocks[r] row r's exclusions (``_RowBlocks``), so a step looks up one dict entry per row
    and never scans the catalog."""

    def __init__(self, constraint: CatalogConstraint, groups: list[int]):
        self.c = constraint
        self.trie = constraint.trie
        n = len(groups)
        self.node = np.zeros(n, dtype=np.int64)
        self.lines = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self.eos = np.asarray(constraint.eos_token_ids, dtype=np.int64)
        base: dict[int, _RowBlocks] = {}
        for g in groups:
            if g not in base:  # a group's exclusions are applied once and copied to its rows
                base[g] = _RowBlocks()
                for item in sorted(constraint.excluded[g]) if constraint.excluded is not None else ():
                    base[g].forbid(self.trie, item)
        self.blocks = [base[g].copy() for g in groups]

    def select(self, keep: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Keep only rows `keep` (the sampler drops finished rows)."""
        keep = keep.tolist() if isinstance(keep, (torch.Tensor, np.ndarray)) else list(keep)
        self.node, self.lines, self.done = self.node[keep], self.lines[keep], self.done[keep]
        self.blocks = [self.blocks[i] for i in keep]

    # ---------------------------------------------------------------- one step
    def allowed(self) -> tuple[np.ndarray, np.ndarray]:
        """The allowed (row, token id) pairs of the next step, as two int64 arrays [K]."""
        trie, node = self.trie, self.node
        n = len(node)
        final_ok = self.lines >= self.c.n_items - 1
        lo = trie.edge_start[node]
        counts = np.where(self.done, 0, trie.edge_start[node + 1] - lo)
        offsets = np.cumsum(counts) - counts
        rows = np.repeat(np.arange(n), counts)
        edges = np.arange(len(rows)) - np.repeat(offsets - lo, counts)
        keep = np.where(final_ok[rows], trie.edge_has_any[edges], trie.edge_has_line[edges])
        for r in np.flatnonzero(~self.done).tolist():
            b = self.blocks[r]
            table = b.blocked_any if final_ok[r] else b.blocked_line
            blocked = table.get(int(node[r])) if table else None
            if blocked:
                keep[offsets[r] + np.asarray(blocked) - lo[r]] = False
        rows, tokens = rows[keep], trie.edge_token[edges[keep]]
        at_final = np.flatnonzero((trie.final_item[node] >= 0) & final_ok & ~self.done)
        eos_ok = self.done.copy()
        for r in at_final.tolist():  # a final variant ends here: <eos> unless its item is forbidden
            eos_ok[r] = int(trie.final_item[node[r]]) not in self.blocks[r].forbidden
        eos_ok |= np.bincount(rows, minlength=n) == 0  # nothing left: end cleanly
        eos_rows = np.repeat(np.flatnonzero(eos_ok), len(self.eos))
        return (np.concatenate([rows, eos_rows]),
                np.concatenate([tokens, np.tile(self.eos, int(eos_ok.sum()))]))

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, V] -> the same with every disallowed token at -inf (the sampler's hook)."""
        rows, tokens = self.allowed()
        r = torch.from_numpy(rows).to(logits.device)
        t = torch.from_numpy(tokens).to(logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[r, t] = logits[r, t]
        return out

    def advance(self, tokens: torch.Tensor | np.ndarray, active: np.ndarray | None = None) -> None:
        """Move every row by its token [N]. Rows with active False (past their end) become done.

        An <eos> ends the row; a token that is no edge of the row's node raises ValueError
        (it could not have been sampled under the constraint)."""
        trie = self.trie
        tok = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        tok = tok.astype(np.int64)
        if active is not None:
            self.done |= ~active
        live = ~self.done
        is_eos = np.isin(tok, self.eos) & live
        self.done |= is_eos
        move = np.flatnonzero(live & ~is_eos)
        if len(move) == 0:
            return
        keys = self.node[move] * trie.key_stride + tok[move]
        pos = np.minimum(np.searchsorted(trie.edge_key, keys), len(trie.edge_key) - 1)
        bad = trie.edge_key[pos] != keys
        if bad.any():
            r = int(move[bad][0])
            raise ValueError(f"row {r}: token {int(tok[r])} is not allowed by the catalog constraint at trie node "
                             f"{int(self.node[r])} (was the completion sampled under this constraint?)")
        child = trie.edge_child[pos].astype(np.int64)
        ended = trie.line_item[child] >= 0
        for r, item in zip(move[ended].tolist(), trie.line_item[child[ended]].tolist()):
            self.blocks[r].forbid(trie, int(item))
        self.lines[move[ended]] += 1
        self.node[move] = np.where(ended, 0, child)


# --------------------------------------------------------------------------------------
# Teacher-forced log-probs under the constraint
# --------------------------------------------------------------------------------------


def allowed_positions(constraint: CatalogConstraint, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Replay the state machine over completions: the allowed (flat position, token id) pairs.

    completion_ids, completion_mask: [B, T]; flat position = b * T + t. Only masked positions
    appear. Raises ValueError if a completion token was not allowed where it stands.
    """
    B, T = completion_ids.shape
    groups = list(range(B))
    if constraint.excluded is not None and len(constraint.excluded) != B:
        raise ValueError(f"the constraint has {len(constraint.excluded)} exclusion sets for {B} rows; "
                         "use constraint.for_rows(prompt_index)")
    state = constraint.start(groups)
    ids = completion_ids.detach().cpu().numpy().astype(np.int64)
    mask = completion_mask.detach().cpu().numpy().astype(bool)
    pos_parts, tok_parts = [], []
    for t in range(T):
        active = mask[:, t]
        if not active.any():
            break
        state.done |= ~active
        rows, toks = state.allowed()
        live = active[rows]
        rows, toks = rows[live], toks[live]
        chosen = np.flatnonzero(active)
        found = np.isin(chosen * state.trie.key_stride + ids[chosen, t], rows * state.trie.key_stride + toks)
        if not found.all():
            r = int(chosen[~found][0])
            raise ValueError(f"row {r}, completion token {t} (id {int(ids[r, t])}) is not allowed by the catalog "
                             "constraint (was the completion sampled under this constraint?)")
        pos_parts.append(rows * T + t)
        tok_parts.append(toks)
        state.advance(ids[:, t], active)
    if not pos_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(pos_parts), np.concatenate(tok_parts)


def constrained_logprobs(logits: torch.Tensor, tokens: torch.Tensor, completion_mask: torch.Tensor,
                         constraint: CatalogConstraint, temperature: float = 1.0, *,
                         return_entropy: bool = False):
    """log p(token) under softmax(logits / T) renormalised over the allowed set -> float32 [B, T].

    logits [B, T, V] (any float dtype; differentiable), tokens [B, T], completion_mask [B, T].
    logp[b, t] = z[b, t, token] - logsumexp_{v allowed at (b, t)} z[b, t, v],  z = logits / T.
    The allowed ids come from ``allowed_positions`` as K (position, id) pairs and are gathered
    (K values), so no [B, T, V] mask is built; K is about (allowed at a line start) x lines +
    (a few) x other tokens. 0 outside the mask. With `return_entropy`, also the entropy of
    the same renormalised distributions [B, T] (no grad).
    """
    B, T, V = logits.shape
    pos, ids = allowed_positions(constraint, tokens, completion_mask)
    device = logits.device
    pos_t = torch.from_numpy(pos).to(device)
    flat = logits.reshape(B * T, V)
    z = flat[pos_t, torch.from_numpy(ids).to(device)].float() / temperature  # [K]
    peak = torch.full((B * T,), float("-inf"), device=device).scatter_reduce(0, pos_t, z.detach(), "amax")
    has = torch.isfinite(peak)
    peak = torch.where(has, peak, torch.zeros_like(peak))
    total = torch.zeros(B * T, device=device).index_add(0, pos_t, (z - peak[pos_t]).exp())
    lse = torch.where(has, total, torch.ones_like(total)).log() + peak
    z_tok = flat.gather(-1, tokens.reshape(B * T, 1)).squeeze(-1).float() / temperature
    valid = has & completion_mask.reshape(-1).bool()
    logp = torch.where(valid, z_tok - lse, torch.zeros_like(lse)).view(B, T)
    if not return_entropy:
        return logp
    with torch.no_grad():
        p = (z - lse[pos_t]).exp()
        mean_z = torch.zeros(B * T, device=device).index_add(0, pos_t, p * z)
        entropy = torch.where(valid, lse - mean_z, torch.zeros_like(lse)).view(B, T)
    return logp, entropy.detach()
