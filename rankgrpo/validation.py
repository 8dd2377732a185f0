"""Greedy validation: each unique prompt's list generated once, scored under the paper's
evaluation protocol. Under torchrun the unique prompts are split over the ranks and the lists
gathered, so N processes generate what one would, each doing 1/N of the work."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm import tqdm

from rankgrpo.catalog import Catalog
from rankgrpo.data import Example, chat_prompt_ids
from rankgrpo.distributed import World
from rankgrpo.evaluation import score_examples
from rankgrpo.models import eos_token_ids
from rankgrpo.sampling import sample
from rankgrpo.segment import decode_completion
from rankgrpo.stopping import ItemLineCounter


@torch.no_grad()
def greedy_completions(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int,
                       batch_size: int = 32, stop_after_items: int | None = None,
                       progress: bool = False, compile: bool = False, constraint=None) -> list[str]:
    """Greedy lists, generated once per unique prompt and shared by examples with that prompt.

    A row stops at its eos or at ``max_new_tokens`` (1,024 in the authors' evaluation scripts, which run vLLM greedily), or, with
    ``stop_after_items``, once it has closed that many lines holding text
    (``rankgrpo.stopping.ItemLineCounter``: blank lines never count; a preamble line does).
    Give N plus a margin for the lines the scoring drops (preamble, seen, out-of-catalog and
    repeated items), since filtered lists shift up and later items reach the top N. ``compile``:
    the sampler's static-cache compiled decode (``sample(..., compile=True)``).
    ``constraint``: a ``rankgrpo.constraint.CatalogConstraint`` whose exclusion sets (if any)
    are one per example (``constraint_for_examples``): decoding is then catalog-constrained,
    and a list ends at <eos> after its N-th catalog line (N: the constraint's ``n_items``)."""
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    counter = None
    if stop_after_items is not None:
        counter = ItemLineCounter.from_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
    unique: dict[str, list[int]] = {}
    first_example: dict[str, int] = {}  # an example of each prompt (same prompt, same seen titles)
    for i, ex in enumerate(examples):
        unique.setdefault(ex.prompt_text, chat_prompt_ids(tokenizer, ex))
        first_example.setdefault(ex.prompt_text, i)
    keys = list(unique)
    texts: dict[str, str] = {}
    for i in tqdm(range(0, len(keys), batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = keys[i:i + batch_size]
        ro = sample(model, [unique[k] for k in chunk], group_size=1, max_new_tokens=max_new_tokens, greedy=True,
                    eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                    stop_after_items=stop_after_items, line_counter=counter, compile=compile,
                    constraint=None if constraint is None else constraint.for_rows([first_example[k] for k in chunk]))
        for k, row, n in zip(chunk, ro.completion_ids, ro.lengths.tolist()):
            texts[k] = decode_completion(row[:n].tolist(), tokenizer)
    if was_training:
        model.train()
    return [texts[ex.prompt_text] for ex in examples]


def rank_share(examples: Sequence[Example], world: World) -> list[Example]:
    """This rank's examples: those whose prompt is among unique prompts r, r + W, r + 2W, ...
    (W processes, this one is rank r), in file order. Every example of a prompt goes to the same
    rank, which generates that prompt's list once.

    >>> from rankgrpo.data import Example
    >>> ex = [Example(id=str(i), messages=[{"role": "user", "content": c}], seen_titles=[], groundtruth=[])
    ...       for i, c in enumerate("abac")]                     # prompts a, b, a, c
    >>> [e.id for e in rank_share(ex, World(rank=0, size=2))]    # unique prompts a, c
    ['0', '2', '3']
    """
    mine = set(list(dict.fromkeys(ex.prompt_text for ex in examples))[world.rank::world.size])
    return [ex for ex in examples if ex.prompt_text in mine]


def shared_greedy_completions(model, tokenizer, examples: Sequence[Example], world: World, *,
                              constraint_for: Callable[[list[Example]], object] | None = None,
                              **kwargs) -> list[str]:
    """`greedy_completions` of ``examples`` with the work split over the ranks (`rank_share`) and
    the lists gathered, so every rank returns the same list of completions, aligned with
    ``examples``. ``constraint_for(own_examples)`` builds this rank's catalog constraint (one
    exclusion set per example it generates for), or None for free decoding."""
    own = rank_share(examples, world)
    constraint = constraint_for(own) if constraint_for is not None else None
    texts = greedy_completions(model, tokenizer, own, constraint=constraint, **kwargs)
    by_prompt: dict[str, str] = {}
    for part in world.gather_objects({ex.prompt_text: t for ex, t in zip(own, texts)}):
        by_prompt.update(part)
    return [by_prompt[ex.prompt_text] for ex in examples]


def validate_generation(model, tokenizer, examples: Sequence[Example], catalog: Catalog, *, max_new_tokens: int,
                        n_items: int = 20, batch_size: int = 32, stop_margin: int = 10, compile: bool = False,
                        constraint_for: Callable[[list[Example]], object] | None = None,
                        world: World = World()) -> dict:
    """Greedy Recall/NDCG@{5,10,20}, in-catalog and format-valid ratios on ``examples`` (means only),
    under the paper's evaluation protocol; catalog-constrained when ``constraint_for`` is given (see
    `shared_greedy_completions`). Under torchrun each rank generates for its share of the prompts
    and every rank returns the same global figures.

    Generation stops at eos, ``max_new_tokens``, or once ``n_items + stop_margin`` lines with
    text are closed (room for lines the scoring filters out; see ``greedy_completions``)."""
    completions = shared_greedy_completions(model, tokenizer, examples, world, constraint_for=constraint_for,
                                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            stop_after_items=n_items + stop_margin, compile=compile)
    agg, _ = score_examples(examples, completions, catalog, ks=(5, 10, 20), n_items=n_items)
    return {f"val_{k}": v["mean"] for k, v in agg.items() if isinstance(v, dict)}
