"""Data parallelism under ``torchrun``: DDP by default, FSDP2 parameter sharding with ``--fsdp``.

Without ``torchrun`` every function here is the single-process identity and nothing changes.
Under ``torchrun --nproc-per-node W`` each of the W processes (ranks) holds the model (DDP: a full
replica; FSDP2: a 1/W shard of every parameter, gradient and optimizer state) and works on its own
share of every global batch:

    SFT   the global batch of micro_batch_size x grad_accum sequences is cut into W contiguous
          shards; each rank's loss is divided by the *global* number of target tokens
    RL    the prompts_per_step prompts are cut into W contiguous shards of whole groups (all G
          completions of a prompt on one rank), so rewards and advantages stay local; the loss
          denominator (rank_mean: B * N, token_mean: tokens) is all-reduced

Each rank's loss is its part of the global loss, so the global gradient is the **sum** of the
ranks' gradients: DDP gets a summing all-reduce hook and FSDP2 a gradient divide factor of 1
(both average by default). Gradient accumulation synchronises only on the last micro-batch.

Rollouts do not depend on the world size: prompt j of step s draws its tokens with its own key,
derived from (seed, s, j) (``prompt_keys``, counter-based draws of ``rankgrpo.counter_rng``), so a
prompt gets the same completions on rank 0 of 1 as on rank 3 of 4, and W processes train like one,
up to float summation order.

Checkpoints: rank 0 writes the HF weights (gathered from the shards under FSDP2) and one
``trainer_state.pt`` holding the optimizer state (DDP: rank 0's, every replica has the same), the
RNG state of every rank and the world size. Under FSDP2 each rank writes its own optimizer shard,
``optimizer-rank{r}.pt``, into the same checkpoint. A resume needs the same world size and mode.
Under LoRA (``--lora-rank``, DDP only) the weights written are the merged ones, with the adapter
alone in ``adapter/`` beside them (``rankgrpo.lora``); the optimizer state is the adapters'.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from rankgrpo.counter_rng import PromptKeys


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK, WORLD_SIZE and LOCAL_RANK in every process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@dataclass(frozen=True)
class World:
    """Where this process stands: rank in [0, size), its GPU index on the node, and the mode
    ("single": no torchrun; "ddp"; "fsdp"). ``device`` is this rank's device (cuda:LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "single"
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.mode != "single"

    # ------------------------------------------------------------------ sharding the work

    def shard(self, items: Sequence, what: str = "items") -> list:
        """This rank's contiguous share of ``items`` (equal shares; len must divide by the size).

        >>> World(rank=1, size=2).shard([10, 11, 12, 13])
        [12, 13]
        """
        n = len(items)
        if n % self.size:
            raise ValueError(f"{n} {what} do not split evenly over {self.size} processes")
        k = n // self.size
        return list(items[self.rank * k:(self.rank + 1) * k])

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, x):
        """Sum of ``x`` over ranks: a tensor (same dtype, on this rank's device), or an int / float."""
        if not self.parallel:
            return x
        if torch.is_tensor(x):
            t = x.detach().to(self.device).clone()
            dist.all_reduce(t)
            return t
        t = torch.tensor(float(x), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return type(x)(t.item())

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean_metrics(self, metrics: dict, sums: Sequence[str] = ()) -> dict:
        """Log row of global values: numbers (and lists of numbers) averaged over ranks, the keys in
        ``sums`` summed (e.g. samples/s). Equal shards make the mean of rank means the global mean."""
        if not self.parallel:
            return metrics
        rows = self.gather_objects(metrics)
        out = {}
        for k, v in metrics.items():
            vals = [r[k] for r in rows]
            if isinstance(v, bool) or not isinstance(v, (int, float, list)) or (
                    k not in sums and all(x == v for x in vals)):
                out[k] = v  # flags, text, and values every rank shares (step, lr, the global loss)
            elif isinstance(v, list):
                out[k] = np.mean(np.asarray(vals, dtype=float), axis=0).tolist()
            else:
                out[k] = float(np.sum(vals) if k in sums else np.mean(vals))
        return out

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def init_world(device: str, fsdp: bool = False) -> World:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on CPU); else a
    single-process World on ``device``. On CUDA each rank takes GPU LOCAL_RANK."""
    if not launched_by_torchrun():
        if fsdp:
            raise SystemExit("error: --fsdp shards the model over processes; start the script with torchrun, "
                             "e.g. torchrun --nproc-per-node 4 train_sft.py --fsdp ...")
        return World(device=device)
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local, mode="fsdp" if fsdp else "ddp", device=device)


def close_world(world: World, finished: bool = True) -> None:
    """Leave the process group. After a run that ``finished`` on every rank: wait for all of them,
    drop the finished collectives still referenced (their tensors must not outlive the interpreter:
    gloo's worker threads would tear them down while Python shuts down), then destroy the group
    while the interpreter is whole. After an error, destroy it at once: a peer may be gone."""
    if world.parallel and dist.is_initialized():
        if finished:
            dist.barrier()
            gc.collect()
        dist.destroy_process_group()


def run_in_world(train, cfg) -> int:
    """A trainer's entry: set up this process's world (a single process without torchrun), run
    ``train(cfg, world)``, and tear the process group down however it ends."""
    world = init_world(cfg.device, cfg.fsdp)
    try:
        code = train(cfg, world)
    except BaseException:
        close_world(world, finished=False)
        raise
    close_world(world)
    return code


# ----------------------------------------------------------------------------- per-prompt sampling RNG


def prompt_keys(seed: int, step: int, positions: Sequence[int], device) -> PromptKeys:
    """The sampler's key of each prompt, for ``sample(..., generator=prompt_keys(...))``: a 64-bit
    key from (seed, step, position of the prompt in the step's global batch) alone, through
    numpy's SeedSequence, so the draws of a prompt's group do not depend on the rank that samples
    it, nor on the other prompts of its batch. A resumed run needs only the step."""
    keys = []
    for j in positions:
        state = np.random.SeedSequence([seed, step, j]).generate_state(2, dtype=np.uint32)
        keys.append(int(state[0]) << 32 | int(state[1]))
    return PromptKeys.from_ints(keys, device)


# ----------------------------------------------------------------------------- wrapping the model


def _sum_allreduce_hook(process_group, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's default divides by W).
    Each rank's loss is already its share of the global loss, so the sum is the global gradient."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def wrap_model(model: torch.nn.Module, world: World, *, trainable: bool = True, bf16: bool = False):
    """The model as this mode trains it (call after gradient checkpointing is set, before the optimizer).

    single: unchanged. ddp: DistributedDataParallel with a summing all-reduce (a frozen model,
    ``trainable=False``, stays a plain replica). fsdp: FSDP2 ``fully_shard`` on every transformer
    block (the classes the HF model lists in ``_no_split_modules``), then on the whole model;
    with ``bf16`` on CUDA, parameters are gathered in bfloat16 and gradients reduced in float32."""
    if world.mode == "ddp":
        if not trainable:
            return model
        from torch.nn.parallel import DistributedDataParallel
        on_gpu = torch.device(world.device).type == "cuda"
        ddp = DistributedDataParallel(model, device_ids=[world.local_rank] if on_gpu else None,
                                      gradient_as_bucket_view=True)  # no second copy of the gradients
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp
    if world.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kwargs = {}
        if bf16 and torch.device(world.device).type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        if not blocks:
            raise SystemExit(f"error: --fsdp: {type(model).__name__} names no transformer block class "
                             "(_no_split_modules) to shard by")
        for m in list(model.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m, **kwargs)
        fully_shard(model, **kwargs)
        for m in _fsdp_modules(model) if trainable else []:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
        return model
    return model


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 keeps the model's own object)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model, enabled: bool):
    """Gradient accumulation: inside ``grad_sync(model, False)`` the backward pass keeps the
    gradients local (no all-reduce / reduce-scatter); the last micro-batch runs with True."""
    from torch.nn.parallel import DistributedDataParallel
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif _fsdp_modules(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def inference_model(model):
    """The model to generate or evaluate with, no gradient synchronisation involved.

    DDP: the replica inside the wrapper. FSDP2: every shard is gathered once and kept whole until
    the block ends (ranks may then run different numbers of forward passes, as sampling does),
    then resharded."""
    modules = _fsdp_modules(model)
    if not modules:
        yield unwrap(model)
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            # FSDP2's defaults: blocks reshard after forward, the root keeps its (small) rest for backward
            m.set_reshard_after_forward(m is not model, recurse=False)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (FSDP2's sharded gradients included) to max_norm (0: no
    clipping, the norm is still measured); returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------- checkpoints


class _HFWeights:
    """What ``save_checkpoint`` / ``save_final`` call ``save_pretrained`` on: the HF model with
    the full state dict (gathered from the shards under FSDP2; merged under LoRA), saved under the
    model's own class. Under LoRA the adapter alone goes beside the weights, into ``adapter/``."""

    def __init__(self, model, state_dict, lora: bool = False):
        self.model = unwrap(model)
        self.state_dict = state_dict
        self.lora = lora

    def save_pretrained(self, path) -> None:
        if self.lora:  # merged here, on the one process that saves, into CPU memory
            from rankgrpo.lora import ADAPTER_DIR, merged_state_dict, save_adapter
            self.model.save_pretrained(path, state_dict=merged_state_dict(self.model))
            save_adapter(self.model, Path(path) / ADAPTER_DIR)
            return
        if self.state_dict is None:
            self.model.save_pretrained(path)
            return
        self.model.save_pretrained(path, state_dict=self.state_dict)
        # FSDP2 subclasses the model as FSDP<Class>; the config must name the plain class
        base = next(c for c in type(self.model).__mro__ if c.__module__.startswith("transformers"))
        cfg_path = Path(path) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [base.__name__]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def hf_weights(model, world: World) -> _HFWeights:
    """Collective under FSDP2 (every rank must call it); rank 0 then saves the result. Under LoRA
    (never with FSDP2): the merged weights under the base model's names, and the adapter."""
    from rankgrpo.lora import lora_layers

    if lora_layers(unwrap(model)):
        return _HFWeights(model, None, lora=True)
    if world.mode != "fsdp":
        return _HFWeights(model, None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied parameters (e.g. lm_head = embed_tokens) come back as separate copies: keep the first name,
    # as save_pretrained does for the unsharded model
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            sd.pop(name, None)
    return _HFWeights(model, sd)


def optimizer_shard_name(rank: int) -> str:
    return f"optimizer-rank{rank}.pt"


def local_optimizer_state(optimizer) -> dict:
    """This rank's optimizer state with FSDP2's DTensors replaced by their local shards (plain tensors)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: v.to_local().cpu() if hasattr(v, "to_local") else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def load_local_optimizer_state(optimizer, sd: dict) -> None:
    """Inverse of ``local_optimizer_state``: each shard becomes a DTensor laid out like its parameter."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in st.items()}
    optimizer.load_state_dict({**sd, "state": state})


def trainer_state_fields(world: World, rng_states: list) -> dict:
    """What a checkpoint records about the processes: every rank's RNG, the world size and the mode."""
    return {"rng": rng_states[0], "rng_per_rank": rng_states, "world_size": world.size,
            "parallel_mode": "fsdp" if world.mode == "fsdp" else "replicated"}


def check_resumable(state: dict, world: World, where) -> None:
    """A checkpoint resumes only at the world size (and sharding mode) that wrote it."""
    saved = state.get("world_size", 1)
    if saved != world.size:
        raise SystemExit(f"error: {where} was written by {saved} process(es), this run has {world.size}; resume "
                         f"it with torchrun --nproc-per-node {saved} (or start a new run from its weights)")
    saved_mode = state.get("parallel_mode", "replicated")
    mode = "fsdp" if world.mode == "fsdp" else "replicated"
    if saved_mode != mode:
        raise SystemExit(f"error: {where} was written {'with' if saved_mode == 'fsdp' else 'without'} --fsdp; "
                         "resume it the same way")


def save_training_checkpoint(world: World, run_dir, step: int, model, tokenizer, optimizer, generator,
                             state: dict, keep_last: int) -> None:
    """Every rank calls this: the weights and optimizer state are gathered (FSDP2) and every rank's
    RNG collected; rank 0 writes ``checkpoints/step-*`` atomically (``save_checkpoint``)."""
    from rankgrpo.checkpoint import checkpoint_dir, rng_state, save_checkpoint

    weights = hf_weights(model, world)
    rngs = world.gather_objects(rng_state(generator))
    shards = []
    if world.mode == "fsdp":  # every rank writes its shard next to where the checkpoint will be
        staging = checkpoint_dir(run_dir) / f".step-{step:06d}.shards"  # pruned if a save is killed
        if world.is_main:
            staging.mkdir(parents=True, exist_ok=True)
        world.barrier()
        shard = staging / optimizer_shard_name(world.rank)
        torch.save(local_optimizer_state(optimizer), shard)
        with open(shard, "rb") as fh:
            os.fsync(fh.fileno())
        world.barrier()
        shards = [staging / optimizer_shard_name(r) for r in range(world.size)]
    if world.is_main:
        opt = None if world.mode == "fsdp" else optimizer.state_dict()
        save_checkpoint(run_dir, step, weights, tokenizer,
                        {"optimizer": opt, **state, **trainer_state_fields(world, rngs)},
                        keep_last=keep_last, move_in=shards)  # its pruning removes the emptied staging
    world.barrier()


def resume_training(world: World, ckpt, model, optimizer, generator) -> dict:
    """Every rank calls this after wrapping the model (loaded from ``ckpt``) and building the
    optimizer: loads the optimizer state and this rank's RNG; returns the trainer state."""
    from rankgrpo.checkpoint import load_trainer_state, set_rng_state

    state = load_trainer_state(ckpt)
    check_resumable(state, world, ckpt)
    if world.mode == "fsdp":
        shard = torch.load(Path(ckpt) / optimizer_shard_name(world.rank), map_location="cpu", weights_only=False)
        load_local_optimizer_state(optimizer, shard)
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state.get("rng_per_rank", [state["rng"]])[world.rank], generator)
    return state


def save_final_weights(world: World, run_dir, model, tokenizer) -> None:
    """RUN/final in HF format, loadable by plain transformers; every rank calls, rank 0 writes."""
    from rankgrpo.checkpoint import save_final

    weights = hf_weights(model, world)
    if world.is_main:
        save_final(run_dir, weights, tokenizer)
    world.barrier()
