"""The sampler against the transformers versions that setup.cfg allows.

transformers 5.24 renamed the forward's `past_key_values` to `cache` and keeps the old name
only as a deprecated alias (a FutureWarning) until 5.40; 4.x and earlier 5.x know only
`past_key_values`. `cache_argument` picks the name the model's forward declares. The static
cache of the compiled decoder takes its write position from the forward's `cache_position` in
4.x, which 5.x dropped (`takes_cache_position`). `make test-min` runs the unit tests on every
floor of setup.cfg (scripts/min_constraints.py).
"""
import configparser
import doctest
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from rankgrpo.compiled_decode import takes_cache_position
from rankgrpo.models import tiny_model
from rankgrpo.kv_cache import cache_argument
from rankgrpo.sampling import sample
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
min_constraints = load_script(ROOT / "scripts" / "min_constraints.py")


class NewStyle(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None):
        pass


class OldStyle(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None, cache_position=None, **kwargs):
        pass


def test_cache_argument_follows_the_forward_signature():
    marker = object()
    assert cache_argument(NewStyle(), marker) == {"cache": marker}
    assert cache_argument(OldStyle(), marker) == {"past_key_values": marker}


def test_cache_position_is_passed_only_where_the_forward_declares_it():
    assert takes_cache_position(OldStyle)
    assert not takes_cache_position(NewStyle)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampling_uses_no_deprecated_argument(arch):
    """A deprecated keyword would raise here (FutureWarning turned into an error)."""
    model = tiny_model(arch, 64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        rollout = sample(model, [[5, 6, 7], [8]], group_size=2, max_new_tokens=4, eos_token_ids=1,
                         greedy=True)
    assert rollout.completion_ids.shape[0] == 4


def test_installed_transformers_is_within_the_declared_bounds():
    """setup.cfg's bounds are the versions this suite was run on (docs/testing.md: transformers versions)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in config["options"]["install_requires"].splitlines()
                       if line.strip().startswith("transformers"))
    lower = re.search(r">=\s*([\w.]+)", requirement)
    assert lower, f"transformers has no lower bound in setup.cfg: {requirement!r}"
    assert Version(transformers.__version__) >= Version(lower.group(1))
    upper = re.search(r"<\s*([\w.]+)", requirement)
    if upper:
        assert Version(transformers.__version__) < Version(upper.group(1))


def test_every_runtime_requirement_has_the_floor_that_test_min_pins():
    """A requirement without a `>=` floor would make `make test-min` stop before installing."""
    assert doctest.testmod(min_constraints).failed == 0
    requirements = min_constraints.install_requires(str(ROOT / "setup.cfg"))
    pins = [min_constraints.floor_pin(r) for r in requirements]
    assert [p.split("==")[0] for p in pins] == [re.match(r"[\w.-]+", r).group(0) for r in requirements]
    assert "transformers" in {p.split("==")[0] for p in pins}
