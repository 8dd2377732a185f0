"""One SFT optimiser step with and without the shared prompt prefix (``--share-prompt-prefix``).

Both layouts train the same model on the same micro-batches, interleaved round by round so
that a busy machine slows both alike:

  * whole rows: every row of the micro-batch runs its full prompt + completion, right-padded,
    and the head runs on every position (what ``--no-share-prompt-prefix`` does);
  * shared prefix: the prompt prefix every row shares (the paper's instruction, ~80 tokens in
    the sandbox) runs once as a batch of one, the rows' own tokens run after it, left-padded,
    and the head runs on the completion window only.

    python benchmarks/bench_sft_step.py --model runs/demo/world/base_model --data runs/demo/demos/train.jsonl \\
        [--batch 16] [--steps 8] [--rounds 3] [--threads 2]

Prints seconds per step of each layout (median over rounds), the speed-up, the tokens each
layout runs, and the largest relative difference of the losses (float rounding only).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankgrpo.data import load_examples
from rankgrpo.losses import sft_loss
from rankgrpo.models import load_model, load_tokenizer
from rankgrpo.sft_data import collate_sft, sft_logits, tokenize_sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model directory (e.g. the sandbox's base_model)")
    ap.add_argument("--data", required=True, help="SFT demonstrations (train.jsonl of build_demos.py)")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (the sandbox preset's 16)")
    ap.add_argument("--steps", type=int, default=8, help="steps per layout per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    examples = load_examples(args.data)[: args.batch * args.steps]
    samples = [tokenize_sft(tok, e) for e in examples]
    batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]
    models = {share: load_model(args.model).train() for share in (False, True)}
    optims = {share: torch.optim.AdamW(m.parameters(), lr=1e-4) for share, m in models.items()}

    def step(share: bool, rows) -> tuple[float, int]:
        model, opt = models[share], optims[share]
        batch = collate_sft(rows, tok.pad_token_id, share_prefix=share)
        loss, _ = sft_loss(sft_logits(model, batch), batch.window_labels(), batch.window_ids())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens = batch.prefix_ids.numel() + int(batch.attention_mask[:, batch.prefix_ids.numel():].sum())
        return loss.item(), tokens

    step(False, batches[0])  # warm-up; each round below restarts both from the same weights
    step(True, batches[0])
    optims = {share: torch.optim.AdamW(m.parameters(), lr=1e-4) for share, m in models.items()}
    times = {False: [], True: []}
    losses = {False: [], True: []}
    tokens = {False: 0, True: 0}
    for r in range(args.rounds):
        models[True].load_state_dict(models[False].state_dict())
        for share in (False, True):
            t0 = time.perf_counter()
            for rows in batches:
                loss, n = step(share, rows)
                if r == 0:
                    losses[share].append(loss)
                    tokens[share] += n
            times[share].append((time.perf_counter() - t0) / len(batches))
    whole, shared = statistics.median(times[False]), statistics.median(times[True])
    diff = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))
    print(f"rows per step {args.batch}, {len(batches)} steps x {args.rounds} rounds, {args.threads} thread(s)")
    print(f"whole rows     {whole:.3f} s/step   {tokens[False] / len(batches):7.0f} tokens/step")
    print(f"shared prefix  {shared:.3f} s/step   {tokens[True] / len(batches):7.0f} tokens/step")
    print(f"speed-up {whole / shared:.2f}x; largest relative loss difference {diff:.1e}")


if __name__ == "__main__":
    main()
