"""LoRA (rankgrpo/lora.py): h = W x + b + (alpha / r) B A dropout(x) on one layer by hand, the
model equal to its base while B = 0, only A and B training, the reference (adapters off) equal to
the starting model, merged weights equal to the adapted model, and the adapter files in PEFT's layout."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rankgrpo.logprobs import token_logprobs
from rankgrpo.lora import (DEFAULT_TARGETS, LoRAError, LoRALinear, LoRASettings, adapter_state_dict, adapters_off,
                           add_lora, load_adapter, lora_layers, match_targets, merged_state_dict, save_adapter,
                           trainable_parameters)
from rankgrpo.models import tiny_model
from rankgrpo.trainer import enable_gradient_checkpointing

SETTINGS = LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=DEFAULT_TARGETS, base_model="base")


def model_pair(seed=0, settings=SETTINGS):
    """(a tiny Qwen2 with adapters, an untouched copy of its base)."""
    base = tiny_model("qwen2", vocab_size=64, seed=seed)
    model = copy.deepcopy(base)
    add_lora(model, settings, seed=1)
    return model, base


def randomise_b(model, seed=2, std=0.3):
    """Stand-in for training: B away from zero, so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_layer_by_hand():
    """W = [[1, 2], [3, 4]], b = [0.5, -0.5], r = 2, A = [[1, -1], [0, 1]], B = [[2, 0], [0.5, 1]], alpha = 4
    (scaling alpha / r = 2), x = [1, 3]:
    W x + b = [7.5, 14.5]; A x = [-2, 3]; B A x = [-4, 2]; times 2 -> [-8, 4]; h = [-0.5, 18.5]."""
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[2.0, 0.0], [0.5, 1.0]]))
    x = torch.tensor([1.0, 3.0])
    assert layer(x).tolist() == [-0.5, 18.5]
    assert layer.delta_weight().tolist() == [[4.0, -4.0], [1.0, 1.0]]  # (alpha / r) B A
    layer.adapter_enabled = False
    assert layer(x).tolist() == [7.5, 14.5]
    assert layer.weight is base.weight and layer.bias is base.bias  # the base's own parameters


def test_init_a_kaiming_uniform_b_zero():
    """A as loralib initialises it (kaiming_uniform_, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn from
    the seed alone; B zero."""
    base = torch.nn.Linear(400, 30)
    layer = LoRALinear(base, rank=16, alpha=16, generator=torch.Generator().manual_seed(5))
    expected = torch.empty(16, 400)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(layer.lora_A.weight, expected)
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    assert layer.lora_A.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform's std
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_b_zero_is_the_base_bit_for_bit():
    model, base = model_pair()
    assert torch.equal(logits(model), logits(base))
    # also in train mode with adapter dropout on: dropout(x) only ever meets B = 0
    model, base = model_pair(settings=LoRASettings(4, 8.0, 0.5, DEFAULT_TARGETS))
    model.train()
    assert torch.equal(model(input_ids=IDS).logits.detach(), logits(base))


def test_targets_every_projection_of_every_block():
    model, _ = model_pair()
    names = list(lora_layers(model))
    assert len(names) == 7 * 2
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS)
    # a dotted suffix names one layer only
    assert match_targets(tiny_model("qwen2", vocab_size=64), ["1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("patterns,message", [
    (["qkv"], r"--lora-targets qkv: no module of Qwen2ForCausalLM is named so; its linear layers are down_proj, "),
    (["self_attn"], r"model.layers.0.self_attn is a Qwen2Attention, not a linear layer"),
    (["lm_head"], r"lm_head shares its weight with model.embed_tokens .tied embeddings."),
    ([], r"names no module"),
])
def test_targets_that_cannot_apply_are_refused(patterns, message):
    with pytest.raises(LoRAError, match=message):
        match_targets(tiny_model("qwen2", vocab_size=64), patterns)


def test_only_the_adapters_train():
    model, base = model_pair()
    adapters = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    assert {id(p) for p in trainable_parameters(model)} == adapters
    assert len(trainable_parameters(base)) == len(list(base.parameters()))  # full fine-tuning: all of them
    model.train()
    model(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # at B = 0 the gradient reaches B only (dL/dA = (alpha / r) B^T dL/dh x^T = 0)
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_B.weight.grad.abs().sum() > 0 and layer.lora_A.weight.grad.abs().sum() == 0
    # a step of AdamW over trainable_parameters moves the adapters and nothing else
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    optimizer.step()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2 * len(lora_layers(model))
    for key, value in merged_state_dict(model).items():
        if not key.endswith("proj.weight"):
            assert torch.equal(value, base.state_dict()[key]), key


def test_adapters_off_is_the_starting_model_exactly():
    """The KL reference under LoRA: after training moved A and B, the policy with its adapters off
    gives the starting model's log-probs bit for bit (also with the shared prompt prefix)."""
    model, base = model_pair()
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=5e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS).logits.logsumexp(-1).mean().backward()
        optimizer.step()
    model.eval()
    assert not torch.equal(logits(model), logits(base))
    with adapters_off(model):
        assert torch.equal(logits(model), logits(base))
    ids = torch.cat([torch.full((3, 4), 7), IDS], dim=1)  # a 4-token prefix every row shares
    attn = torch.ones_like(ids)
    for share in (False, True):
        with torch.no_grad(), adapters_off(model):
            ref = token_logprobs(model, ids, attn, 6, share_prefix=share)
        with torch.no_grad():
            start = token_logprobs(base, ids, attn, 6, share_prefix=share)
        assert torch.equal(ref, start), share
    assert all(layer.adapter_enabled for layer in lora_layers(model).values())  # switched back on
    assert not torch.equal(logits(model), logits(base))


def test_merged_equals_unmerged():
    model, base = model_pair()
    randomise_b(model)
    merged = copy.deepcopy(base)
    state = merged_state_dict(model)
    assert state.keys() == {k for k in base.state_dict() if k != "lm_head.weight"}  # lm_head is tied
    merged.load_state_dict(state, strict=False)
    merged.tie_weights()
    assert (logits(model) - logits(base)).abs().max() > 1e-2  # the adapters matter
    # (W + BA)x and Wx + B(Ax) round differently in float32, and the order of a matmul's sums changes
    # with the machine and its thread count: float32's own tolerances, a thousand times below the
    # adapters' effect above (a fixed 1e-6 failed on one machine at 1.2e-6)
    torch.testing.assert_close(logits(merged), logits(model), rtol=1.3e-6, atol=1e-5)


def test_adapter_files_in_peft_layout_round_trip(tmp_path):
    model, base = model_pair()
    randomise_b(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": list(DEFAULT_TARGETS), "base_model_name_or_path": "base"}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in saved
    assert saved["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # [out, r]
    assert len(saved) == 2 * 14
    fresh, _ = model_pair()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), logits(model))
    assert all(torch.equal(saved[k], v) for k, v in adapter_state_dict(fresh).items())
    other, _ = model_pair(settings=LoRASettings(8, 8.0, 0.0, DEFAULT_TARGETS, "base"))
    with pytest.raises(LoRAError, match=r"written with --lora-rank 4, this run has 8"):
        load_adapter(other, tmp_path / "adapter")


def test_gradient_checkpointing_reaches_the_adapters():
    """Frozen embeddings: without the input-grad hook no gradient would enter the checkpointed blocks."""
    model, _ = model_pair()
    randomise_b(model)
    plain = copy.deepcopy(model)
    enable_gradient_checkpointing(model)
    for m in (model, plain):
        m.train()
        m(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_peft_loads_our_adapter_with_equal_outputs(tmp_path):
    """Skipped without the `peft` package (pip install 'rankgrpo[lora-check]')."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, base = model_pair()
    randomise_b(model)
    base.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1.3e-6, atol=1e-5)  # as above
    merged = loaded.merge_and_unload()
    ours = merged_state_dict(model)
    for key, value in merged.state_dict().items():
        if key in ours:
            torch.testing.assert_close(value, ours[key], rtol=0, atol=1e-6)
