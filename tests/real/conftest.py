"""Fixtures of the real-model tier (`make test-real`; deselected from `make test` by the `real` marker).

The assets come from `scripts/fetch_real_assets.py`, cached under $RANKGRPO_CACHE (default
~/.cache/rankgrpo); the authors' Reddit-v2 sample and catalog from RANKGRPO_REDDIT_SAMPLE and
RANKGRPO_REDDIT_CATALOG. Nothing here downloads anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("RANKGRPO_CACHE", "~/.cache/rankgrpo")).expanduser()
SMOLLM2 = CACHE / "smollm2-135m-instruct"
TOKENIZER_DIRS = {"qwen2": CACHE / "tokenizers" / "qwen2", "llama3": CACHE / "tokenizers" / "llama3",
                  "smollm2": SMOLLM2}


def asset(path: Path) -> Path:
    if not (path / "asset.json").exists():
        pytest.fail(f"{path} is missing: run `make test-real` (it runs scripts/fetch_real_assets.py first)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return asset(SMOLLM2)


@pytest.fixture(scope="session")
def reddit_sample() -> tuple[str, str]:
    """(sample JSONL, catalog .pkl) of the authors' Reddit-v2 data, from the environment."""
    sample, catalog = os.environ.get("RANKGRPO_REDDIT_SAMPLE"), os.environ.get("RANKGRPO_REDDIT_CATALOG")
    if not (sample and catalog):
        pytest.skip("RANKGRPO_REDDIT_SAMPLE / RANKGRPO_REDDIT_CATALOG not set")
    return sample, catalog


@pytest.fixture(scope="session")
def reddit_examples(reddit_sample):
    from rankgrpo.data import load_examples

    return load_examples(reddit_sample[0])
