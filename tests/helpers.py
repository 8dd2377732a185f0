"""Plain helpers several test modules import (``from helpers import script``)."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from rankgrpo.sandbox import SandboxConfig
from rankgrpo.sft_data import SFTSample

ROOT = Path(__file__).resolve().parents[1]
# the tiny sandbox world of the script-level tests: 200 films, 64 training conversations, a 2-layer model
TINY = SandboxConfig(n_films=200, n_train=64, n_validation=8, n_test=8, hidden_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=1024)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def script(name, *args, timeout=300):
    """Run one of the four scripts in a subprocess; assert exit 0 and return its stdout."""
    res = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"{name} failed:\n{res.stderr[-3000:]}"
    return res.stdout


def collate_right_padded(samples: Sequence[SFTSample], pad_token_id: int):
    """The plain layout the shared-prefix SFT batches are checked against: each row its whole
    sequence, right-padded. -> input_ids [B, L], attention_mask [B, L] (from lengths), labels_mask [B, L]."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels_mask)
    return ids, attn, labels
