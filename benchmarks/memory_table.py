"""Memory of one Rank-GRPO step on one GPU, full fine-tuning against LoRA, computed (not measured)
from the published Qwen2.5 shapes: the table of docs/scaling.md ("One GPU: LoRA").

    python benchmarks/memory_table.py                      # Markdown table: 0.5B, 3B, 7B; the paper's RL shapes
    python benchmarks/memory_table.py --rank 8 --prompt-tokens 1024 --json runs/memory_table.json

The paper's RL shapes (App. C): 48 prompts x G = 8 completions per step, 1,024 new tokens,
micro-batch 16, bf16 autocast. What the trainers hold, in bytes (P parameters of the model,
P_a of the LoRA adapters, GB = 1e9 bytes):

    weights      4 P                 float32 (the trainers load float32; --bf16 is autocast). LoRA adds 4 P_a
    gradients    4 P   | LoRA 4 P_a  float32, of what trains
    AdamW        8 P   | LoRA 8 P_a  two float32 moments of what trains
    reference    4 P   | LoRA 0      the frozen KL reference (beta > 0); LoRA: the policy with adapters off
    activations  per micro-batch of b = 16 rows of S = prompt + 1,024 tokens, L layers, saved for backward:
                 no checkpointing:  b S L a,             a = 24 h + 4 d_kv + 8 I  (+ 14 r under LoRA)
                 checkpointing:     b S (4 h L + a)      each block's float32 input, one block recomputed
                 with a the bytes per token and layer: bf16 (2 B) copies of the q/k/v input (h), q, k, v after
                 rotary (h + 2 d_kv), the attention output (h), the MLP input (h), gate and up (2 I), SiLU(gate)
                 (I), the down-projection input (I), and the two RMSNorms' float32 input and normalised value
                 (4 x 4 h); LoRA keeps each adapted layer's A x (r values in bf16, 7 layers)
    logits       2 x b T V x 2 B     the completion positions' bf16 logits, kept for backward, and their gradient
    KV cache     B_s S L 2 d_kv 2 B  the rollout's bf16 cache of all B_s = 384 rows (sampling, before the update)

    peak         weights + gradients + AdamW + reference + max(activations + logits, KV cache)

Not counted: autocast's bf16 copies of the weights (2 P while a forward pass runs, full fine-tuning),
the sampler's logits, allocator fragmentation, CUDA context (about 0.5 GB). Attention is SDPA (no
S x S matrix kept). h: hidden size, d_kv: KV heads x head size, I: MLP size, V: vocabulary, T: new tokens.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A Qwen2.5 decoder's shapes (its published config.json)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


QWEN25 = [
    Shape("Qwen2.5-0.5B", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936, tied=True),
    Shape("Qwen2.5-3B", hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11_008, vocab=151_936, tied=True),
    Shape("Qwen2.5-7B", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18_944, vocab=152_064, tied=False),
]
# the projections --lora-targets adapts by default: (in, out) of each
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def n_params(s: Shape) -> int:
    """Embedding (+ untied output head) + per block: q/k/v with biases, o, the SwiGLU MLP, two norms; final norm."""
    h, d, i = s.hidden, s.kv_dim, s.intermediate
    block = (h * h + h) + 2 * (h * d + d) + h * h + 3 * h * i + 2 * h
    return s.vocab * h * (1 if s.tied else 2) + s.layers * block + h


def n_lora_params(s: Shape, rank: int) -> int:
    """r (in + out) for each adapted projection of each block."""
    h, d, i = s.hidden, s.kv_dim, s.intermediate
    in_out = {"q_proj": (h, h), "k_proj": (h, d), "v_proj": (h, d), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return s.layers * sum(rank * (a + b) for a, b in (in_out[t] for t in TARGETS))


def activation_bytes_per_token_layer(s: Shape, lora_rank: int = 0) -> int:
    """a = 24 h + 4 d_kv + 8 I (+ 2 B x r for each of the 7 adapted layers under LoRA); see the module docstring."""
    h, d, i = s.hidden, s.kv_dim, s.intermediate
    return 2 * (4 * h + 2 * d + 4 * i) + 4 * 4 * h + 2 * len(TARGETS) * lora_rank


@dataclass
class Row:
    model: str
    method: str
    checkpointing: bool
    trained: int
    weights: float
    gradients: float
    adamw: float
    reference: float
    activations: float
    logits: float
    kv_cache: float
    peak: float


def memory_row(s: Shape, *, lora_rank: int, checkpointing: bool, prompts: int, group: int, micro_batch: int,
               prompt_tokens: int, new_tokens: int) -> Row:
    P = n_params(s)
    trained = n_lora_params(s, lora_rank) if lora_rank else P
    weights = 4 * P + (4 * trained if lora_rank else 0)
    gradients, adamw = 4 * trained, 8 * trained
    reference = 0 if lora_rank else 4 * P
    S = prompt_tokens + new_tokens
    a = activation_bytes_per_token_layer(s, lora_rank)
    per_token = (4 * s.hidden * s.layers + a) if checkpointing else s.layers * a
    activations = micro_batch * S * per_token
    logits = 2 * micro_batch * new_tokens * s.vocab * 2
    kv = prompts * group * S * s.layers * 2 * s.kv_dim * 2
    peak = weights + gradients + adamw + reference + max(activations + logits, kv)
    return Row(s.name, f"LoRA r={lora_rank}" if lora_rank else "full", checkpointing, trained,
               *(x / GB for x in (weights, gradients, adamw, reference, activations, logits, kv, peak)))


def table(rows: list[Row]) -> str:
    head = ("| model | method | checkpointing | trained parameters | weights | gradients | AdamW | reference | "
            "activations | logits | rollout KV cache | peak |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.model} | {r.method} | {'yes' if r.checkpointing else 'no'} | {r.trained / 1e6:,.1f} M | "
                     + " | ".join(f"{x:.1f}" for x in (r.weights, r.gradients, r.adamw, r.reference,
                                                        r.activations, r.logits, r.kv_cache))
                     + f" | **{r.peak:.1f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--prompts", type=int, default=48, help="prompts per step (paper 48)")
    p.add_argument("--group", type=int, default=8, help="G (paper 8)")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward (paper 16)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length assumed (the authors cut at 2,048)")
    p.add_argument("--new-tokens", type=int, default=1024, help="completion budget (paper 1,024)")
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args(argv)
    rows = [memory_row(s, lora_rank=r, checkpointing=c, prompts=args.prompts, group=args.group,
                       micro_batch=args.micro_batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
            for s in QWEN25 for r in (0, args.rank) for c in (False, True)]
    print(f"GB (1e9 bytes) on one GPU, one Rank-GRPO step: {args.prompts} prompts x G = {args.group}, "
          f"{args.prompt_tokens}-token prompts + {args.new_tokens} new tokens, micro-batch {args.micro_batch}, "
          "bf16 autocast, float32 weights")
    print(", ".join(f"{s.name}: {n_params(s) / 1e9:.2f} B parameters" for s in QWEN25))
    print()
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
