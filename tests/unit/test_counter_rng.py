"""The counter-based draws of `PromptKeys` (rankgrpo.counter_rng): the published splitmix64
sequence, exact 64-bit arithmetic on int64 tensors, the [P * G, T] layout, no host
synchronisation, and statistical checks that the draws are uniform and that neighbours (next
decode step, next sample, next prompt position, next RL step, next seed) are independent.

The statistical checks use bounds that hold for any n (no normal approximation), each with a
false-alarm probability below 1e-6 for a correct generator; the draws are a fixed function of
the seeds, so the outcome is fixed too. `test_the_checks_reject_a_generator_without_mixing`
shows that they fail on a visibly flawed generator.
"""
from __future__ import annotations

import math

import pytest
import torch

from rankgrpo import counter_rng
from rankgrpo.counter_rng import (PromptKeys, as_int64, splitmix64, splitmix64_reference, unit_interval)
from rankgrpo.distributed import prompt_keys
from rankgrpo.next_token import choose_row_tokens

ALPHA = 1e-6
MASK64 = (1 << 64) - 1


def test_splitmix64_is_the_published_sequence():
    """The first numbers of splitmix64 seeded with 0 (java.util.SplittableRandom's mixer; the
    sequence of the reference C implementation, prng.di.unimi.it/splitmix64.c)."""
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [splitmix64_reference(0, c) for c in range(3)] == expected
    ours = splitmix64(torch.zeros(3, dtype=torch.long), torch.arange(3))
    assert [x & MASK64 for x in ours.tolist()] == expected


def test_int64_tensor_arithmetic_equals_python_integers():
    """Overflowing products, negative keys (top bit set) and large counters: the tensor version
    wraps exactly like the unsigned reference, and its logical shifts shift in zeros."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-2**63, 2**63 - 1, (200,), generator=g, dtype=torch.long)
    keys[:4] = torch.tensor([0, -1, -2**63, 2**63 - 1])
    counters = torch.randint(0, 2**40, (200,), generator=g, dtype=torch.long)
    ours = splitmix64(keys, counters).tolist()
    for k, c, z in zip(keys.tolist(), counters.tolist(), ours):
        assert z & MASK64 == splitmix64_reference(k & MASK64, c)
    u = unit_interval(torch.tensor(ours)).tolist()
    assert u == [((z & MASK64) >> 12) / 2**52 + 2**-53 for z in ours]


def test_unit_interval_never_reaches_0_or_1():
    u = unit_interval(torch.tensor([0, -1, 1 << 12, (1 << 12) - 1, -2**63])).tolist()
    assert u == [2**-53, 1 - 2**-53, 2**-52 + 2**-53, 2**-53, 0.5 + 2**-53]
    assert 0 < min(u) and max(u) < 1


def test_draws_layout_and_independence_of_other_prompts():
    keys = PromptKeys.from_ints([3, 2**64 - 5, 12345678901234567890])
    draws = keys.draws(4, 5)
    assert draws.shape == (12, 5) and draws.dtype == torch.float64
    for p, key in enumerate([3, 2**64 - 5, 12345678901234567890]):
        for s in range(4):
            for t in range(5):
                z = splitmix64_reference(key, t * counter_rng.STEP_STRIDE + s)
                assert draws[p * 4 + s, t].item() == (z >> 12) / 2**52 + 2**-53
    # a prompt's draws are its own, whatever other keys are drawn with it
    assert torch.equal(PromptKeys(keys.keys[1:2]).draws(4, 5), draws[4:8])
    assert torch.equal(PromptKeys(keys.keys.flip(0)).draws(4, 5)[8:], draws[:4])
    with pytest.raises(ValueError, match="samples per prompt"):
        keys.draws(counter_rng.STEP_STRIDE + 1, 1)
    with pytest.raises(ValueError, match="1-D int64"):
        PromptKeys(torch.zeros(3))
    assert as_int64(2**64 - 1) == -1 and as_int64(2**63) == -2**63 and as_int64(5) == 5


@pytest.fixture
def no_host_sync(monkeypatch):
    """Every way a tensor's value reaches Python (what makes the host wait for a GPU) raises."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation: a tensor value was read on the host")

    for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(2).tolist()  # the patch is in force
    with pytest.raises(AssertionError, match="host synchronisation"):
        bool(torch.ones(()))
    yield


def test_drawing_with_prompt_keys_reads_nothing_back_to_the_host(no_host_sync):
    """On a GPU, reading a value (.tolist(), .item(), bool(tensor)) waits for every queued kernel;
    the per-prompt torch.Generators this replaces needed one such read per decode step."""
    keys = PromptKeys(torch.tensor([11, -7, 2**40]))
    draws = keys.draws(4, 6)
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 2, 5, 6, 9, 11])  # what is left after some rows finished
    for top_p in (1.0, 0.9):
        tokens, logprobs = choose_row_tokens(logits[:7], rows, 4, temperature=0.8, top_p=top_p, greedy=False,
                                             generator=draws, decode_step=3)
        assert tokens.shape == logprobs.shape == (7,)


# ----------------------------------------------------------------------------- statistics


SEEDS, STEPS, POSITIONS, G, T = 2, 4, 32, 8, 64
AXES = {"seed": 0, "step": 1, "position": 2, "sample": 3, "decode step": 4}
CELLS = 4  # each draw's bin in the pair test: [0, 1/4), ..., [3/4, 1)


def trainer_draws() -> torch.Tensor:
    """float64 [SEEDS, STEPS, POSITIONS, G, T]: the draws of the trainer's keys (prompt_keys)."""
    return torch.stack([torch.stack([prompt_keys(seed, step, range(POSITIONS), "cpu").draws(G, T)
                                     .reshape(POSITIONS, G, T) for step in range(STEPS)]) for seed in range(SEEDS)])


def uniformity_failures(u: torch.Tensor) -> list[str]:
    """What is wrong with draws u [SEEDS, STEPS, POSITIONS, G, T] as independent U(0, 1) numbers.

    - Distribution: the Kolmogorov distance D of their empirical distribution to U(0, 1), against
      the Dvoretzky-Kiefer-Wolfowitz bound P(D > eps) <= 2 exp(-2 n eps^2).
    - Neighbours along each axis (seed, RL step, prompt position, sample, decode step): the pairs
      (u_i, u_i+1) binned in 4 x 4 cells; each cell's frequency within eps of 1/16 (Hoeffding,
      P(|freq - p| >= eps) <= 2 exp(-2 n eps^2), with a union bound over all cells of all axes),
      and their correlation: the mean of (u - 1/2)(u' - 1/2), each term in [-1/4, 1/4], within
      eps of 0 (Hoeffding: P >= eps <= 2 exp(-8 n eps^2), union bound over the axes).
    - No two draws equal: for 131,072 draws of 52 random bits, a coincidence has probability 2e-6.
    Each check's bound is set for a false alarm below 1e-6 in all.
    """
    failures = []
    flat = u.flatten().sort().values
    n = flat.numel()
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(ecdf_hi - flat, flat - (ecdf_hi - 1 / n)).max().item()
    eps = math.sqrt(math.log(2 / ALPHA) / (2 * n))
    if distance > eps:
        failures.append(f"Kolmogorov distance {distance:.4f} > {eps:.4f}")
    if flat.unique().numel() != n:
        failures.append(f"{n - flat.unique().numel()} repeated draws")
    for name, axis in AXES.items():
        m = u.shape[axis] - 1
        a, b = u.narrow(axis, 0, m).flatten(), u.narrow(axis, 1, m).flatten()
        pairs = a.numel()
        cell = (a * CELLS).long() * CELLS + (b * CELLS).long()
        freq = torch.bincount(cell, minlength=CELLS * CELLS).double() / pairs
        eps_cell = math.sqrt(math.log(2 * CELLS * CELLS * len(AXES) / ALPHA) / (2 * pairs))
        worst = (freq - 1 / CELLS**2).abs().max().item()
        if worst > eps_cell:
            failures.append(f"{name}: a pair cell is off 1/16 by {worst:.4f} > {eps_cell:.4f}")
        covariance = ((a - 0.5) * (b - 0.5)).mean().item()
        eps_cov = math.sqrt(math.log(2 * len(AXES) / ALPHA) / (8 * pairs))
        if abs(covariance) > eps_cov:
            failures.append(f"{name}: covariance {covariance:.5f} beyond {eps_cov:.5f}")
    return failures


def test_draws_are_uniform_and_neighbours_independent():
    u = trainer_draws()
    assert u.numel() == 131_072 and 0 < u.min().item() and u.max().item() < 1
    assert uniformity_failures(u) == []


def test_the_checks_reject_a_generator_without_mixing(monkeypatch):
    """Without the finaliser, draw c of a key is the Weyl sequence key + (c + 1) * GAMMA: neighbouring
    samples and steps are then fixed rotations of each other, which the pair cells see."""
    monkeypatch.setattr(counter_rng, "mix64", lambda z: z)
    failures = uniformity_failures(trainer_draws())
    assert any(f.startswith("sample:") for f in failures), failures
    assert any(f.startswith("decode step:") for f in failures), failures
