"""Catalog-constrained decoding: the trie against brute-force prefix matching, the state
machine's allowed sets against a brute-force rule, sampled lists, and log-prob parity.

A small byte-level BPE tokenizer (the sandbox's, with Qwen2's pre-tokenizer) is trained on a
small catalog with shared prefixes ("Heat" in two years, "Heat Wave", "Aliens" after "Alien")
and a title that continues past another item's final variant ("Foo (1995) Bar (2000)" after
"Foo (1995)"). Models are tiny and random; nothing is downloaded.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankgrpo import constraint as constraint_module
from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.constraint import (CatalogConstraint, allowed_positions, build_catalog_trie, catalog_lines,
                                 catalog_trie, constrained_logprobs, seen_items)
from rankgrpo.counter_rng import PromptKeys
from rankgrpo.models import tiny_model
from rankgrpo.parsing import format_recommendations
from rankgrpo.sampling import sample, token_logprobs
from rankgrpo.sandbox.model import IM_END, build_tokenizer

FILMS = [("Heat", 1995), ("Heat", 1986), ("Heat Wave", 2001), ("Alien", 1979), ("Aliens", 1986),
         ("Alien Nation", 1988), ("The Wall", 1982), ("The Wall Street", 1987), ("Amélie", 2001),
         ("Foo", 1995), ("Foo (1995) Bar", 2000), ("Ran", 1985), ("Rango", 2011), ("12 Angry Men", 1957),
         ("'Salem's Lot", 1979), ("Léon: The Professional", 1994), ("Up", 2009), ("Us", 2019),
         ("東京物語", 1953), ("Die Hard", 1988), ("Die Hard 2", 1990), ("M", 1931)]
N_ITEMS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    catalog = Catalog([CatalogItem(t, y) for t, y in FILMS])
    rng = random.Random(0)
    texts = [format_recommendations(rng.sample(FILMS, 6)) for _ in range(300)] + ["Pretend you are a recommender."]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    trie = build_catalog_trie(catalog, tokenizer)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    return catalog, tokenizer, trie, eos


@pytest.fixture(scope="module")
def model(world):
    _, tokenizer, _, _ = world
    return tiny_model("qwen2", len(tokenizer), initializer_range=0.1, seed=3)


def sequences(trie, catalog):
    """Brute force: every (item, final?, tokens) the trie should hold."""
    return [(i, final, trie.item_tokens(i, final)) for i in range(len(catalog)) for final in (False, True)]


# ----------------------------------------------------------------------------- the trie


def test_lines_tokenised_in_context_reproduce_the_tokenizer_on_full_lists(world):
    catalog, tokenizer, trie, _ = world
    assert not trie.dropped and trie.first_line_mismatch == 0
    rng = random.Random(1)
    for _ in range(200):
        idx = rng.sample(range(len(catalog)), rng.randint(1, 8))
        text = format_recommendations([(catalog[i].title, catalog[i].year) for i in idx])
        ours = [t for i in idx[:-1] for t in trie.item_tokens(i)] + trie.item_tokens(idx[-1], final=True)
        assert ours == tokenizer(text, add_special_tokens=False)["input_ids"], text
    # the line variant ends in the line break, the final one does not
    for i, line in enumerate(catalog_lines(catalog)):
        assert tokenizer.decode(trie.item_tokens(i)) == line + "\n"
        assert tokenizer.decode(trie.item_tokens(i, final=True)) == line


def test_trie_equals_brute_force_prefix_matching(world):
    catalog, _, trie, _ = world
    seqs = sequences(trie, catalog)
    # every node: its children are exactly the next tokens of the sequences it prefixes,
    # and its counts are the items it prefixes
    for node in range(trie.num_nodes):
        prefix = [int(trie.edge_token[trie.parent_edge[u]]) for u in reversed(trie.path(node)[:-1])]
        k = len(prefix)
        below = [(i, final, s) for i, final, s in seqs if s[:k] == prefix]
        assert below, prefix
        assert set(trie.children(node)) == {s[k] for _, _, s in below if len(s) > k}
        assert trie.n_line[node] == len({i for i, final, _ in below if not final})
        assert trie.n_any[node] == len({i for i, _, _ in below})
        ends = {(i, final) for i, final, s in below if len(s) == k}
        assert {(int(trie.line_item[node]), False)} - {(-1, False)} == {e for e in ends if not e[1]}
        assert {(int(trie.final_item[node]), True)} - {(-1, True)} == {e for e in ends if e[1]}
    # "Foo (1995)"'s final variant ends inside "Foo (1995) Bar (2000)"'s path
    foo = catalog.lookup("Foo", 1995, 0)
    assert trie.children(int(trie.item_final_end[foo]))


def test_random_prefixes_are_found_iff_some_line_starts_with_them(world):
    catalog, tokenizer, trie, _ = world
    seqs = [s for _, _, s in sequences(trie, catalog)]
    alphabet = sorted({t for s in seqs for t in s}) + [5, 6]
    rng = random.Random(2)
    for _ in range(2000):
        prefix = rng.choice(seqs)[: rng.randint(0, 6)]
        prefix = prefix + [rng.choice(alphabet) for _ in range(rng.randint(0, 2))]
        node, found = 0, True
        for tok in prefix:
            node = trie.children(node).get(tok)
            if node is None:
                found = False
                break
        assert found == any(s[:len(prefix)] == prefix for s in seqs)


def test_cache_memory_and_disk(world, tmp_path, monkeypatch):
    catalog, tokenizer, trie, _ = world
    monkeypatch.setattr(constraint_module, "_MEMORY", {})
    first = catalog_trie(catalog, tokenizer, cache_dir=tmp_path)
    assert catalog_trie(catalog, tokenizer, cache_dir=tmp_path) is first   # memory
    files = list(tmp_path.glob("catalog-trie-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(constraint_module, "_MEMORY", {})
    monkeypatch.setattr(constraint_module, "build_catalog_trie", lambda *a: pytest.fail("rebuilt"))
    loaded = catalog_trie(catalog, tokenizer, cache_dir=tmp_path)              # disk
    for name in trie._ARRAYS:
        assert np.array_equal(getattr(loaded, name), getattr(trie, name)), name
    smaller = Catalog([CatalogItem(t, y) for t, y in FILMS[:-1]])
    monkeypatch.undo()
    monkeypatch.setattr(constraint_module, "_MEMORY", {})
    catalog_trie(smaller, tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("catalog-trie-*.npz"))) == 2                 # another key


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "one_array_short"])
def test_a_damaged_cache_file_is_rebuilt_and_replaced(world, tmp_path, monkeypatch, damage):
    """An interrupted copy or a full disk leaves a broken .npz; the run rebuilds it instead of crashing."""
    catalog, tokenizer, trie, _ = world
    monkeypatch.setattr(constraint_module, "_MEMORY", {})
    catalog_trie(catalog, tokenizer, cache_dir=tmp_path)
    (path,) = tmp_path.glob("catalog-trie-*.npz")
    good = path.read_bytes()
    if damage == "one_array_short":       # a valid archive from an older writer, missing one array
        z = dict(np.load(path, allow_pickle=False))
        del z["item_final_end"]
        np.savez(path, **z)
    else:
        path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"PK\x03\x04" + b"x" * 64}[damage])
    monkeypatch.setattr(constraint_module, "_MEMORY", {})
    rebuilt = catalog_trie(catalog, tokenizer, cache_dir=tmp_path)
    for name in trie._ARRAYS:
        assert np.array_equal(getattr(rebuilt, name), getattr(trie, name)), name
    assert path.read_bytes() == good                                         # replaced by a whole file


# ----------------------------------------------------------------------------- the state machine


def brute_force_allowed(trie, catalog, eos, n_items, forbidden, lines, prefix):
    """The rule of the module docstring, by scanning every sequence."""
    k = len(prefix)
    out = set()
    for i, final, s in sequences(trie, catalog):
        if i in forbidden or (final and lines < n_items - 1):
            continue
        if s[:k] == prefix and len(s) > k:
            out.add(s[k])
        if final and s == prefix:
            out.add(eos)
    if not out:
        out.add(eos)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n_items=st.integers(1, 6), n_seen=st.integers(0, 3))
def test_allowed_sets_equal_brute_force_along_random_walks(world, seed, n_items, n_seen):
    catalog, _, trie, eos = world
    rng = random.Random(seed)
    excluded = frozenset(rng.sample(range(len(catalog)), n_seen))
    state = CatalogConstraint(trie, n_items, [eos], (excluded,)).start([0])
    forbidden, lines, prefix = set(excluded), 0, []
    for _ in range(120):
        rows, tokens = state.allowed()
        got = set(tokens[rows == 0].tolist())
        assert len(got) == int((rows == 0).sum())  # no duplicates
        assert got == brute_force_allowed(trie, catalog, eos, n_items, forbidden, lines, prefix)
        tok = rng.choice(sorted(got))
        state.advance(torch.tensor([tok]))
        if tok == eos:
            assert state.done[0]
            break
        prefix.append(tok)
        ended = [i for i, final, s in sequences(trie, catalog) if not final and s == prefix]
        if ended:
            forbidden.add(ended[0])
            lines += 1
            prefix = []
        assert state.lines[0] == lines and (state.node[0] == 0) == (prefix == [])
    else:
        pytest.fail("no <eos> within 120 tokens")


def test_worked_example_two_films(world):
    """The module docstring's example, with N = 2 over a two-film catalog."""
    _, tokenizer, _, eos = world
    catalog = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
    trie = build_catalog_trie(catalog, tokenizer)
    state = CatalogConstraint(trie, 2, [eos]).start([0])

    def allowed():
        return set(state.allowed()[1].tolist())

    heat, alien = trie.item_tokens(0), trie.item_tokens(1)
    assert allowed() == {heat[0], alien[0]}
    for tok in heat:
        state.advance(torch.tensor([tok]))
    assert state.lines[0] == 1 and allowed() == {alien[0]}          # no repeat, no <eos> yet
    for tok in alien[:-1]:
        state.advance(torch.tensor([tok]))
    final_last = trie.item_tokens(1, final=True)[-1]
    assert allowed() == {alien[-1], final_last}                      # ")\n" or ")" as line 2
    state.advance(torch.tensor([alien[-1]]))
    assert allowed() == {eos}                                         # all titles used: forced
    with pytest.raises(ValueError, match="not allowed"):  # no edge of the root
        state.advance(torch.tensor([alien[-1]]))


def test_final_variant_and_eos_only_at_line_n(world):
    catalog, _, trie, eos = world
    up = catalog.lookup("Up", 2009, 0)
    for lines_before, n_items, expect_final in ((0, 3, False), (2, 3, True), (3, 3, True)):
        state = CatalogConstraint(trie, n_items, [eos]).start([0])
        state.lines[0] = lines_before
        for tok in trie.item_tokens(up)[:-1]:
            state.advance(torch.tensor([tok]))
        got = set(state.allowed()[1].tolist())
        assert (trie.item_tokens(up, final=True)[-1] in got) == expect_final
        assert eos not in got


# ----------------------------------------------------------------------------- sampling


def prompts_for(tokenizer, n, seed=0):
    rng = random.Random(seed)
    return [tokenizer(" ".join(rng.choice(["films", "like", "Heat", "please", "Alien", "scary"])
                               for _ in range(rng.randint(2, 8))))["input_ids"] for _ in range(n)]


def completion_lines(rollout, tokenizer, r):
    n = int(rollout.lengths[r])
    return tokenizer.decode(rollout.completion_ids[r, :n].tolist(), skip_special_tokens=True).split("\n")


def check_lists(rollout, tokenizer, catalog, excluded=None, n_items=N_ITEMS):
    """Every line is exactly a catalog line (text, not the parse: "Foo (1995) Bar (2000)" parses
    as Foo 1995), none twice, none excluded; at least N lines unless the titles ran out."""
    item_of = {line: i for i, line in enumerate(catalog_lines(catalog))}
    for r in range(rollout.num_rows):
        assert rollout.ended_with_eos[r], "every row ends at <eos> (no budget cut in these tests)"
        lines = completion_lines(rollout, tokenizer, r)
        if lines[-1] == "":  # a forced <eos> after the last allowed title leaves a trailing line break
            assert len(lines) - 1 == len(catalog) - len(excluded[int(rollout.prompt_index[r])] if excluded else ())
            lines = lines[:-1]
        assert all(line in item_of for line in lines), lines
        idx = [item_of[line] for line in lines]
        assert len(set(idx)) == len(idx), "no repeats"
        assert len(idx) >= min(n_items, len(catalog) - len(excluded[int(rollout.prompt_index[r])] if excluded else ()))
        if excluded is not None:
            assert not set(idx) & excluded[int(rollout.prompt_index[r])]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.7, 1.0, 2.0]),
       top_p=st.sampled_from([1.0, 0.9]))
def test_every_sampled_line_is_a_catalog_line(world, model, seed, temperature, top_p):
    catalog, tokenizer, trie, eos = world
    constraint = CatalogConstraint(trie, N_ITEMS, [eos])
    rollout = sample(model, prompts_for(tokenizer, 2, seed), group_size=3, max_new_tokens=400,
                     temperature=temperature, top_p=top_p, eos_token_ids=eos, pad_token_id=0,
                     generator=torch.Generator().manual_seed(seed), constraint=constraint, compact_fraction=0.0)
    check_lists(rollout, tokenizer, catalog)


def test_seen_titles_are_excluded_and_rows_never_deadlock(world, model):
    catalog, tokenizer, trie, eos = world
    excluded = (seen_items(catalog, ["heat", "ALIEN"]), frozenset())
    assert len(excluded[0]) == 3  # both "Heat" films and "Alien", not "Heat Wave" or "Aliens"
    # N larger than the catalog: each row writes every allowed title once, then must end
    constraint = CatalogConstraint(trie, 50, [eos], excluded)
    rollout = sample(model, prompts_for(tokenizer, 2, 5), group_size=2, max_new_tokens=600, temperature=1.5,
                     eos_token_ids=eos, pad_token_id=0, generator=torch.Generator().manual_seed(0),
                     constraint=constraint)
    check_lists(rollout, tokenizer, catalog, excluded, n_items=50)
    counts = [len(completion_lines(rollout, tokenizer, r)) - 1 for r in range(4)]  # - the trailing ""
    assert counts == [len(catalog) - 3] * 2 + [len(catalog)] * 2


def test_greedy_under_the_constraint_is_the_argmax_of_the_masked_logits(world, model):
    catalog, tokenizer, trie, eos = world
    constraint = CatalogConstraint(trie, N_ITEMS, [eos])
    prompts = prompts_for(tokenizer, 3, 7)
    rollout = sample(model, prompts, group_size=1, max_new_tokens=300, greedy=True, eos_token_ids=eos,
                     pad_token_id=0, constraint=constraint)
    check_lists(rollout, tokenizer, catalog)
    ids, attn, start = rollout.model_inputs()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, start - 1:-1]
    pos, tok = allowed_positions(constraint, rollout.completion_ids, rollout.completion_mask)
    T = rollout.completion_ids.shape[1]
    masked = torch.full_like(logits, float("-inf")).view(-1, logits.shape[-1])
    masked[pos, tok] = logits.reshape(-1, logits.shape[-1])[pos, tok]
    argmax = masked.view_as(logits).argmax(-1)
    m = rollout.completion_mask
    assert torch.equal(argmax[m], rollout.completion_ids[m]) and T > 10


# ----------------------------------------------------------------------------- exact log-probs


@pytest.mark.parametrize("temperature,greedy", [(1.0, False), (0.7, False), (1.0, True)])
def test_sampler_and_token_logprobs_agree_under_the_constraint(world, model, temperature, greedy):
    catalog, tokenizer, trie, eos = world
    excluded = (seen_items(catalog, ["Heat"]), frozenset(), seen_items(catalog, ["Up", "M"]))
    constraint = CatalogConstraint(trie, N_ITEMS, [eos], excluded)
    rollout = sample(model, prompts_for(tokenizer, 3, 11), group_size=4, max_new_tokens=300,
                     temperature=temperature, greedy=greedy, eos_token_ids=eos, pad_token_id=0,
                     generator=torch.Generator().manual_seed(1), constraint=constraint)
    ids, attn, start = rollout.model_inputs()
    row_constraint = constraint.for_rows(rollout.prompt_index)
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, start, temperature, constraint=row_constraint)
        plain = token_logprobs(model, ids, attn, start, temperature)
    m = rollout.completion_mask
    assert (logp - rollout.logprobs)[m].abs().max() <= 1e-5
    assert torch.allclose(torch.exp(logp - rollout.logprobs)[m], torch.ones(int(m.sum())), atol=1e-5)  # ratio 1
    # at the first token of each line the allowed set is large and the constraint matters
    pos, _ = allowed_positions(row_constraint, rollout.completion_ids, m)
    sizes = np.bincount(pos, minlength=m.numel()).reshape(m.shape)
    line_start = torch.zeros_like(m)
    line_start[:, 0] = True
    nl = torch.tensor([tokenizer.decode([t]).endswith("\n") for t in range(len(tokenizer))])
    line_start[:, 1:] = nl[rollout.completion_ids[:, :-1]]
    line_start &= m
    assert (torch.from_numpy(sizes)[line_start] >= 8).all() and sizes.max() >= 14
    assert ((logp - plain)[line_start] > 1e-3).all()  # renormalised over a strict subset: larger
    assert (logp - rollout.logprobs)[line_start].abs().max() <= 1e-5


def test_constrained_logprobs_equal_a_dense_masked_log_softmax_with_gradients(world, model):
    catalog, tokenizer, trie, eos = world
    constraint = CatalogConstraint(trie, N_ITEMS, [eos])
    rollout = sample(model, prompts_for(tokenizer, 2, 3), group_size=2, max_new_tokens=300, eos_token_ids=eos,
                     pad_token_id=0, generator=torch.Generator().manual_seed(4), constraint=constraint)
    ids, attn, start = rollout.model_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, start - 1:-1].double()
    m = rollout.completion_mask
    tokens = rollout.completion_ids
    # reference: a dense [B, T, V] mask, log_softmax, autograd
    pos, tok = allowed_positions(constraint, tokens, m)
    dense = torch.zeros(logits.shape, dtype=torch.bool).view(-1, logits.shape[-1])
    dense[pos, tok] = True
    dense = dense.view(logits.shape)
    a = logits.clone().requires_grad_(True)
    z = (a / 0.8).masked_fill(~dense, float("-inf")).log_softmax(-1)
    ref = torch.where(m, z.gather(-1, tokens[..., None]).squeeze(-1), torch.zeros((), dtype=z.dtype))
    weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.double)
    (ref * weights).sum().backward()
    b = logits.clone().requires_grad_(True)
    ours, entropy = constrained_logprobs(b, tokens, m, constraint, 0.8, return_entropy=True)
    (ours.double() * weights).sum().backward()
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    assert torch.isfinite(b.grad).all() and torch.allclose(b.grad, a.grad, atol=1e-5)
    p = z.exp()
    ref_entropy = -(torch.where(dense, p * z, torch.zeros((), dtype=z.dtype))).sum(-1)
    assert torch.allclose(entropy.double()[m], ref_entropy[m].detach(), atol=1e-4)
    assert (entropy[~m] == 0).all() and (ours[~m] == 0).all()


def test_token_logprobs_refuses_a_completion_the_constraint_forbids(world, model):
    catalog, tokenizer, trie, eos = world
    constraint = CatalogConstraint(trie, N_ITEMS, [eos])
    text = format_recommendations([("Heat", 1995), ("Heat", 1995)])  # a repeat
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]])
    prompt = torch.tensor([prompts_for(tokenizer, 1)[0]])
    inputs = torch.cat([prompt, ids], 1)
    with pytest.raises(ValueError, match="not allowed by the catalog constraint"):
        token_logprobs(model, inputs, torch.ones_like(inputs), prompt.shape[1], constraint=constraint)
    with pytest.raises(ValueError, match="exclusion sets"):
        sample(model, [prompt[0].tolist()], group_size=1, max_new_tokens=5, eos_token_ids=eos,
               constraint=CatalogConstraint(trie, N_ITEMS, [eos], (frozenset(), frozenset())))


def test_one_key_per_prompt_under_the_constraint(world, model):
    # the trainers sample with one key per prompt (rankgrpo.distributed): a prompt's
    # constrained group is then the one it gets alone, with its own exclusion set
    catalog, tokenizer, trie, eos = world
    excluded = (seen_items(catalog, ["heat"]), frozenset())
    prompts = prompts_for(tokenizer, 2, 3)

    def run(which):
        constraint = CatalogConstraint(trie, N_ITEMS, [eos], tuple(excluded[p] for p in which))
        return sample(model, [prompts[p] for p in which], group_size=3, max_new_tokens=300, eos_token_ids=eos,
                      pad_token_id=0, generator=PromptKeys.from_ints([10 + p for p in which]),
                      constraint=constraint)

    both, alone = run([0, 1]), run([1])
    check_lists(both, tokenizer, catalog, excluded)
    for r in range(3):
        n = int(alone.lengths[r])
        assert int(both.lengths[3 + r]) == n
        assert torch.equal(both.completion_ids[3 + r, :n], alone.completion_ids[r, :n])
        assert torch.allclose(both.logprobs[3 + r, :n], alone.logprobs[r, :n], atol=1e-5)


def test_the_compiled_decode_refuses_a_constraint(world, model):
    catalog, tokenizer, trie, eos = world
    with pytest.raises(NotImplementedError, match=r"compile=True\) does not apply a constraint"):
        sample(model, prompts_for(tokenizer, 1), group_size=2, max_new_tokens=8, eos_token_ids=eos, pad_token_id=0,
               compile=True, constraint=CatalogConstraint(trie, N_ITEMS, [eos]))


def test_rl_step_logprobs_use_each_rows_own_exclusions(world, model):
    # prepare_batch / update_pass: micro-batches of 2 rows straddle the prompts (rows 2-3 are one
    # of prompt 0 and one of prompt 1), which exclude different titles, so each row's normaliser
    # at a line start differs by prompt. The reference's and the behaviour log-probs must be the
    # sampler's (ratio 1, KL 0 to an identical reference); a row scored under its neighbour's
    # exclusions gets another normaliser, or a token that set forbids.
    import copy

    from test_rl_step import config

    from rankgrpo.data import Example
    from rankgrpo.rl import prepare_batch, update_pass

    catalog, tokenizer, trie, eos = world
    seen = [["Heat", "Alien", "The Wall", "Foo", "Ran", "Up", "Us", "M"], []]
    examples = [Example(id=f"p{p}", messages=[{"role": "user", "content": "films"}], seen_titles=s,
                        groundtruth=[("Die Hard", 1988)]) for p, s in enumerate(seen)]
    excluded = tuple(seen_items(catalog, s) for s in seen)
    assert len(excluded[0]) >= 8 and not excluded[1]
    constraint = CatalogConstraint(trie, N_ITEMS, [eos], excluded)
    cfg = config(group_size=3, n_items=N_ITEMS, micro_batch_size=2, beta=1e-3, temperature=1.0)
    rollout = sample(model, prompts_for(tokenizer, 2, 11), group_size=3, max_new_tokens=300, temperature=1.0,
                     eos_token_ids=eos, pad_token_id=0, generator=torch.Generator().manual_seed(4),
                     constraint=constraint)
    check_lists(rollout, tokenizer, catalog, excluded)
    batch = prepare_batch(rollout, examples, tokenizer, catalog, cfg, reference=copy.deepcopy(model),
                          constraint=constraint)
    assert len(batch.micro) == 3 and len(batch.constraints) == 3
    metrics = update_pass(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    for j, rows in enumerate(batch.micro):
        m = rollout.completion_mask[rows]
        assert torch.allclose(batch.ref_logp[j][m], rollout.logprobs[rows][m], atol=1e-5)
        assert torch.allclose(batch.old_logp[j][m], rollout.logprobs[rows][m], atol=1e-5)
    assert metrics["ratio/min"] == pytest.approx(1.0, abs=1e-5) and metrics["ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-8)
