"""Counter-based random draws for sampling with one key per prompt (`PromptKeys`).

Why. The RL trainer wants prompt p's group of G completions to depend only on (seed, step,
position of p in the step's global batch): not on the rank that samples it, the other prompts
of its batch, or eager against compiled decoding (`rankgrpo.distributed.prompt_keys`). One
torch.Generator per prompt gives that, but each must be drawn from separately, in a Python loop
over the prompts still decoding, which the host has to read off the device at every step.

Here each draw is instead a fixed function of a key and a counter. `PromptKeys.draws` computes
all of a `sample` call's draws at its start, for every row and step at once, with int64 tensor
arithmetic on the model's device; a decode step then looks up one column (no host
synchronisation, the same two kernels whatever the number of prompts). At decode step t,
sample s of prompt p draws

    U(p, t, s) = (k + 1/2) / 2^52,   k = the top 52 bits of splitmix64_c(key_p),   c = t * 2^20 + s

where splitmix64_c(key) is the c-th number (from 0) of the splitmix64 sequence seeded with key
(Steele, Lea and Flood, 2014; java.util.SplittableRandom): mix64(key + (c + 1) * GAMMA), mix64 a
bijective finaliser of 64-bit integers (Stafford's "Mix13" constants). U is a float64 in
[2^-53, 1 - 2^-53]: never 0 or 1, and (k + 1/2) / 2^52 = (2k + 1) / 2^53 is exact in float64.
`rankgrpo.next_token` turns U into a token by inversion of the row's cumulative distribution,
so one draw per row and step is all a token needs (`inverse_cdf_tokens`).

int64 tensors wrap around on overflow (two's complement), so + and * are exact mod 2^64; a
right shift of an int64 tensor is arithmetic, so the logical shift x >>> k is (x >> k) masked
to its low 64 - k bits. `splitmix64_reference` is the same function in Python integers, and the
tests hold the two equal and to the published sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio, odd
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
STEP_STRIDE = 1 << 20  # counter = t * STEP_STRIDE + s, so at most 2^20 samples per prompt
U_BITS = 52


def as_int64(x: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits: 2^64 - 1 -> -1."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _logical_shift(z: torch.Tensor, k: int) -> torch.Tensor:
    """z >>> k on int64 tensors (the bits shifted in are 0, not copies of the sign)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor, elementwise (a bijection of 64-bit integers)."""
    z = (z ^ _logical_shift(z, 30)) * as_int64(MIX1)
    z = (z ^ _logical_shift(z, 27)) * as_int64(MIX2)
    return z ^ _logical_shift(z, 31)


def splitmix64(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The counter-th number (from 0) of the splitmix64 sequence seeded with key; int64 tensors
    (broadcast), the result's bits are those of the unsigned 64-bit number."""
    return mix64(key + (counter + 1) * as_int64(GAMMA))


def splitmix64_reference(key: int, counter: int) -> int:
    """`splitmix64` in Python integers, for the tests: an unsigned 64-bit result."""
    m = (1 << 64) - 1
    z = (key + (counter + 1) * GAMMA) & m
    z = ((z ^ (z >> 30)) * MIX1) & m
    z = ((z ^ (z >> 27)) * MIX2) & m
    return z ^ (z >> 31)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """The top 52 bits k of int64 `bits` as the float64 (k + 1/2) / 2^52, in [2^-53, 1 - 2^-53]."""
    k = _logical_shift(bits, 64 - U_BITS)
    return (2 * k + 1).double() * 2.0 ** -(U_BITS + 1)


@dataclass(frozen=True)
class PromptKeys:
    """One 64-bit key per prompt, for `sample(..., generator=PromptKeys(...))`.

    keys: LongTensor [P] (the bits of each unsigned 64-bit key). Prompt p's rows draw only from
    keys[p] (`draws`), so its group is the same whatever other prompts are sampled with it, in
    whatever order, eagerly or compiled. Derive them from a seed with
    `rankgrpo.distributed.prompt_keys(seed, step, positions, device)`, or give any integers:

        PromptKeys.from_ints([10, 11, 12])   # three prompts
    """

    keys: torch.Tensor

    def __post_init__(self):
        if self.keys.dtype != torch.int64 or self.keys.dim() != 1:
            raise ValueError(f"PromptKeys needs a 1-D int64 tensor, got {self.keys.dtype} of shape "
                             f"{tuple(self.keys.shape)}")

    @classmethod
    def from_ints(cls, keys, device="cpu") -> "PromptKeys":
        """Keys from Python integers (any size: their low 64 bits are used)."""
        return cls(torch.tensor([as_int64(int(k)) for k in keys], dtype=torch.long, device=device))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, device) -> "PromptKeys":
        return PromptKeys(self.keys.to(device))

    def draws(self, G: int, T: int) -> torch.Tensor:
        """Every draw of a sample of G completions per prompt and at most T new tokens: float64
        [P * G, T], row p * G + s, column t = U(p, t, s) of the module docstring (sample s of
        prompt p at decode step t), on the keys' device. Pure tensor arithmetic, no host
        synchronisation; 8 bytes per row and new token, computed once per `sample` call so that a
        decode step only looks its column up (`rankgrpo.next_token.choose_row_tokens`).

        Example: G = 2, T = 3 -> [P * 2, 3]; row 5 (sample 1 of prompt 2) holds U(2, t, 1) for t = 0, 1, 2,
        the same numbers when prompt 2 is sampled alone with PromptKeys(keys[2:3])."""
        if not 0 < G <= STEP_STRIDE:
            raise ValueError(f"PromptKeys draws allow 1 to {STEP_STRIDE} samples per prompt, not {G}")
        device = self.keys.device
        counter = torch.arange(G, device=device)[:, None] + torch.arange(T, device=device) * STEP_STRIDE  # [G, T]
        return unit_interval(splitmix64(self.keys[:, None, None], counter)).reshape(len(self) * G, T)
