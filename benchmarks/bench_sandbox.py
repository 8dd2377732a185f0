"""Sandbox cost: generate the default world (catalog, splits, tokenizer, base model), time one
training step of the base model, and the simulated teacher's throughput.

    python benchmarks/bench_sandbox.py [--threads 2] [--calibrate]

Target: the default world in at most 60 s on 2 CPU cores; a training step on 16 x 256 tokens
well under a second.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rankgrpo.sandbox import SandboxConfig, SandboxTeacher, build_world, calibrate, calibration_report  # noqa: E402


def train_step_seconds(model_dir: Path, batch: int, length: int, steps: int = 7) -> tuple[float, float]:
    """(min, median) wall time of forward + backward + AdamW step on [batch, length] random tokens
    (the minimum is the better estimate on a shared machine)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[0], times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    ap.add_argument("--out", default="", help="keep the world in this directory (default: a temporary one)")
    ap.add_argument("--calibrate", action="store_true", help="also run the test-split calibration")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "world"
        cfg = SandboxConfig()
        t0 = time.perf_counter()
        cfg_data = SandboxConfig(build_model=False)
        build_world(cfg_data, out)
        t_data = time.perf_counter() - t0
        t0 = time.perf_counter()
        world = build_world(cfg, out)
        t_all = time.perf_counter() - t0
        print(f"default world (data only): {t_data:.1f}s")
        print(f"default world (data + tokenizer + base model): {t_all:.1f}s  (target <= 60s)")
        fastest, median = train_step_seconds(out / "base_model", 16, 256)
        print(f"base model train step, 16 x 256 tokens, {args.threads} threads: {fastest:.3f}s "
              f"(median {median:.3f}s)")
        teacher = SandboxTeacher(world)
        exs = world.examples("test")[:200]
        t0 = time.perf_counter()
        answers = [teacher.chat(ex.messages) for ex in exs]
        print(f"teacher: {len(exs) / (time.perf_counter() - t0):.0f} recommendation answers/s")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / "base_model")
        prompt_len = [len(tok.apply_chat_template(ex.messages, add_generation_prompt=True, return_dict=True)
                          ["input_ids"]) for ex in exs]
        answer_len = [len(tok.encode(a, add_special_tokens=False)) + 1 for a in answers]
        print(f"tokens: prompt mean {sum(prompt_len) / len(prompt_len):.0f} / max {max(prompt_len)}, "
              f"20-line completion + eos mean {sum(answer_len) / len(answer_len):.0f} / max {max(answer_len)} "
              f"(vocabulary {len(tok)})")
        if args.calibrate:
            print(calibration_report(calibrate(world, teacher)))


if __name__ == "__main__":
    main()
