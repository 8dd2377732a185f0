"""LoRA: train a low-rank update of chosen linear layers, freeze every weight of the base model.

The LoRA paper (Hu et al., 2021, Eq. 3) writes a layer's forward pass as h = W0 x + B A x and
scales the update by alpha / r (its §4.1). With the layer's bias b and dropout on the adapter's
input (as the authors' reference implementation, microsoft/LoRA ``loralib/layers.py``, class
``Linear``, applies it):

    h = W x + b + (alpha / r) * B A dropout(x)

    x [..., in]   W [out, in], b [out]: the base layer, frozen
    A [r, in]     Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)): the choice of
                  loralib's ``Linear.reset_parameters`` (the default init of an nn.Linear weight)
    B [out, r]    zeros, so the model starts equal to the base model bit for bit

Only A and B train. Three consequences the trainers use:

- ``adapters_off(model)``: inside it every adapted layer computes W x + b alone, the base model's
  forward pass exactly. Rank-GRPO's KL reference (the starting model) is the policy itself with its
  adapters off: no second copy of the weights.
- ``merged_state_dict(model)``: W + (alpha / r) B A under the base's own parameter names, what
  ``final/`` holds; it loads in plain transformers.
- ``save_adapter`` / ``load_adapter``: A and B alone, in the layout PEFT reads
  (``adapter_config.json`` and ``adapter_model.safetensors`` with keys
  ``base_model.model.<module path>.lora_A.weight``), also what an exact ``--resume`` reloads on top
  of the base model.

Which layers: ``--lora-targets`` names modules as PEFT's ``target_modules`` list does: a pattern
matches a module whose dotted path equals it or ends with "." + pattern (``q_proj`` matches
``model.layers.3.self_attn.q_proj``). The default is every attention and MLP projection.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The attention and MLP projections of Qwen2 / Llama-style blocks (never switched by model name).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"  # beside a checkpoint's merged weights
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the base model inside its wrapper


class LoRAError(ValueError):
    """A LoRA setting that cannot apply to this model (the message says which)."""


@dataclass(frozen=True)
class LoRASettings:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapter input, the target
    module patterns, and the base model the adapter belongs to (written into adapter_config.json)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_model: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (the same ``weight`` and ``bias`` parameters, frozen) plus a rank-r update.

    Its state dict keeps the base layer's names (``weight``, ``bias``) and adds ``lora_A.weight``
    [r, in] and ``lora_B.weight`` [out, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the base layer's own parameters, not copies
        self.bias = base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.adapter_enabled = True
        with torch.no_grad():
            init = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(init)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: W x + b, plus (alpha / r) B A dropout(x) while the adapter is on."""
        h = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return h
        return h + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A -> [out, in], in float32: what merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


# ----------------------------------------------------------------------------- attaching


def match_targets(model: nn.Module, patterns) -> list[str]:
    """Dotted paths of the modules ``patterns`` name (PEFT's list rule: the path equals a pattern
    or ends with "." + pattern). Each pattern must match at least one module, and only
    ``nn.Linear`` layers whose weight no other module shares (tied embeddings cannot merge)."""
    if not patterns:
        raise LoRAError("--lora-targets names no module")
    names = [n for n, _ in model.named_modules() if n]

    def matches(name: str, pattern: str) -> bool:
        return name == pattern or name.endswith("." + pattern)

    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise LoRAError(f"--lora-targets {pattern}: no module of {type(model).__name__} is named so; its "
                            f"linear layers are {', '.join(leaves)}")
    chosen = [n for n in names if any(matches(n, p) for p in patterns)]  # in the model's order
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            owners.setdefault(id(m.weight), []).append(n)
    modules = dict(model.named_modules())
    for n in chosen:
        m = modules[n]
        if not isinstance(m, nn.Linear):
            raise LoRAError(f"--lora-targets: {n} is a {type(m).__name__}, not a linear layer")
        if len(owners[id(m.weight)]) > 1:
            raise LoRAError(f"--lora-targets: {n} shares its weight with {owners[id(m.weight)][0]} (tied "
                            "embeddings); an update of it cannot be merged into one matrix")
    return chosen


def add_lora(model: nn.Module, settings: LoRASettings, seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and put a ``LoRALinear`` in place of each target layer
    (in place). A is drawn from a generator seeded with ``seed`` alone, so every process of a
    data-parallel run starts from the same adapters, whatever ran before. Returns the paths."""
    names = match_targets(model, settings.targets)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(getattr(parent, child), settings.rank, settings.alpha, settings.dropout, generator)
        setattr(parent, child, layer)
    model.lora_settings = settings
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Path -> adapted layer (empty for a model without adapters)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps: all of them in full fine-tuning, A and B under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run ``model`` as its base: every adapted layer computes W x + b alone (a no-op for a model
    without adapters). Under LoRA this is the frozen reference model of Rank-GRPO's KL term."""
    layers = list(lora_layers(model).values())
    before = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.adapter_enabled = state


def describe(model: nn.Module) -> str:
    """One line: rank, alpha, the adapted layers and the share of parameters that train."""
    s: LoRASettings = model.lora_settings
    layers = lora_layers(model)
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return (f"lora: rank {s.rank}, alpha {s.alpha:g} (scaling {s.scaling:g}), dropout {s.dropout:g}, on "
            f"{len(layers)} layers ({', '.join(kinds)}); {n_train:,} trainable parameters of {n_all:,} "
            f"({100 * n_train / n_all:.2f}%)")


# ----------------------------------------------------------------------------- merged weights


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with W + (alpha / r) B A in place of each adapted W: the same
    keys as the model had before ``add_lora`` (a tied weight is kept under its first name, as
    ``save_pretrained`` does). Each merge is computed in float32 on W's device, one layer at a
    time, and kept in CPU memory in W's dtype; the other entries are the model's own tensors."""
    layers = lora_layers(model)
    merged = {}
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.weight.float() + layer.delta_weight()
            merged[f"{name}.weight"] = w.to("cpu", layer.weight.dtype)
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if isinstance(value, nn.Parameter):
            if id(value) in seen:
                continue
            seen.add(id(value))
        out[key] = merged.get(key, value.detach())
    return out


# ----------------------------------------------------------------------------- the adapter files (PEFT layout)


def adapter_config(settings: LoRASettings) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter of a causal LM."""
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": settings.base_model,
            "r": settings.rank, "lora_alpha": alpha, "lora_dropout": settings.dropout,
            "target_modules": list(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A and B under PEFT's key names: ``base_model.model.<module path>.lora_A.weight`` [r, in] and
    ``...lora_B.weight`` [out, r] (contiguous CPU copies)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model.lora_settings), indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise LoRAError(f"{path}: no {ADAPTER_CONFIG}")
    return json.loads(file.read_text())


def check_same_settings(saved: dict, settings: LoRASettings, where) -> None:
    """A saved adapter resumes only with the rank, alpha, dropout and targets that wrote it."""
    wanted = adapter_config(settings)
    for key, flag in (("r", "--lora-rank"), ("lora_alpha", "--lora-alpha"), ("lora_dropout", "--lora-dropout"),
                      ("target_modules", "--lora-targets")):
        if saved.get(key) != wanted[key]:
            raise LoRAError(f"{where} was written with {flag} {saved.get(key)}, this run has {wanted[key]}; "
                            "resume it with the same LoRA flags")


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Copy A and B from ``save_adapter``'s files into the adapted layers of ``model`` (every key
    must be there with its shape; settings must match ``model.lora_settings``)."""
    from safetensors.torch import load_file

    path = Path(path)
    check_same_settings(read_adapter_config(path), model.lora_settings, path)
    saved = load_file(str(path / ADAPTER_WEIGHTS))
    expected = adapter_state_dict(model)
    if saved.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        raise LoRAError(f"{path / ADAPTER_WEIGHTS}: keys do not match this model's adapters "
                        f"(missing {missing[:2]}, unexpected {extra[:2]})")
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in saved.items():
            name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]
            target = getattr(layers[name], part).weight
            if value.shape != target.shape:
                raise LoRAError(f"{path / ADAPTER_WEIGHTS}: {key} has shape {list(value.shape)}, "
                                f"the model's is {list(target.shape)}")
            target.copy_(value)
