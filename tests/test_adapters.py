import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from align.adapters import (
    PBLoraConfig,
    PreferenceNotSetError,
    SVDLoraConfig,
    get_preference,
    merge_at_preference,
    objectives_of,
    set_preference,
)
from align.adapters.base import PreferenceLayer
from align.models import load_model
from align.testing import tiny_causal_lm

OBJECTIVES = ["helpful", "harmless"]
KINDS = ["pblora", "svdlora"]


def make_config(kind, **overrides):
    # init_weights=False makes every factor non-zero, so no check passes by multiplying by 0.
    settings = dict(objectives=OBJECTIVES, init_weights=False, lora_dropout=0.0)
    settings.update(overrides)
    if kind == "pblora":
        return PBLoraConfig(**settings)
    return SVDLoraConfig(**settings)


def base_model(which):
    if which == "tiny":
        return tiny_causal_lm(seed=0)
    return load_model()  # the embedded SmolLM2, fresh (get_peft_model modifies it in place)


@pytest.fixture(
    params=[(k, m) for m in ("tiny", "smollm2") for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def adapted(request):
    kind, which = request.param
    model, tokenizer = base_model(which)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, make_config(kind)).eval()
    batch = tokenizer(
        ["Hello there, how are you today?", "Tell me a joke"], return_tensors="pt", padding=True
    )
    return kind, which, peft_model, tokenizer, batch


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def preference_layers(model):
    return [m for m in model.modules() if isinstance(m, PreferenceLayer)]


# --- the α contract on the model -----------------------------------------------------------


def test_forgetting_alpha_is_an_error(adapted):
    _, _, model, _, batch = adapted
    with pytest.raises(PreferenceNotSetError, match="set_preference"):
        logits(model, batch)


def test_alpha_stays_set_and_is_validated(adapted):
    _, _, model, _, batch = adapted
    set_preference(model, {"harmless": 0.25, "helpful": 0.75})
    assert get_preference(model).to_dict() == {"helpful": 0.75, "harmless": 0.25}
    first = logits(model, batch)
    assert torch.equal(first, logits(model, batch))  # still set on the next call
    with pytest.raises(ValueError, match="sums to"):
        set_preference(model, [0.5, 0.6])
    with pytest.raises(ValueError, match="missing"):
        set_preference(model, {"helpful": 1.0})
    assert objectives_of(model) == tuple(OBJECTIVES)


def test_preference_changes_the_output(adapted):
    _, _, model, _, batch = adapted
    assert not torch.allclose(
        logits(model, batch, pref=[1.0, 0.0]), logits(model, batch, pref=[0.0, 1.0])
    )


def test_per_call_pref_equals_set_preference_and_is_restored(adapted):
    _, _, model, _, batch = adapted
    set_preference(model, [0.9, 0.1])
    expected = logits(model, batch)
    other = logits(model, batch, pref="helpful=0.2,harmless=0.8")
    set_preference(model, [0.2, 0.8])
    assert torch.equal(other, logits(model, batch))
    set_preference(model, [0.9, 0.1])
    logits(model, batch, pref=[0.2, 0.8])
    assert torch.equal(logits(model, batch), expected)  # the per-call α did not stick


def test_per_row_alpha_equals_separate_single_alpha_calls(adapted):
    _, _, model, _, batch = adapted
    rows = torch.tensor([[0.8, 0.2], [0.1, 0.9]], dtype=torch.float64)
    batched = logits(model, batch, pref=rows)
    for i in range(2):
        single = logits(model, batch, pref=rows[i])
        # float32 reductions differ slightly with the batch layout; a wrong α differs by >0.1
        torch.testing.assert_close(batched[i], single[i], rtol=1e-4, atol=5e-4)
    with pytest.raises(ValueError, match="3 rows but the input batch has 2"):
        logits(model, batch, pref=torch.tensor([[1.0, 0.0]] * 3))


# --- the update is what the formula says -----------------------------------------------------


def independent_dense_update(kind, layer, alpha):
    """ΔW(α) written out from the parameters, without the layer's own code paths."""
    if kind == "pblora":
        a, b = layer.pblora_A["default"].weight, layer.pblora_B["default"].weight
        core = layer.pblora_core["default"]
        r1, r2 = core.r1, core.r2
        w2 = (core.theta @ alpha).reshape(r2, r2)
        dense = b[:, :r1] @ core.w1 @ a[:r1] + b[:, r1:] @ w2 @ a[r1:]
        return layer.scaling["default"] * dense
    u, v = layer.svdlora_U["default"].weight, layer.svdlora_V["default"].weight
    core = layer.svdlora_core["default"]
    singular = torch.cat([core.sigma, core.pref_scale * alpha])
    return layer.scaling["default"] * (u * singular) @ v


def test_layer_output_equals_the_independent_dense_update(adapted):
    kind, _, model, _, _ = adapted
    alpha = torch.tensor([0.3, 0.7])
    set_preference(model, alpha)
    for layer in preference_layers(model)[:4]:
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ independent_dense_update(kind, layer, alpha).T
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                layer.get_delta_weight("default"), independent_dense_update(kind, layer, alpha)
            )


def test_svdlora_vertex_switches_on_only_that_objectives_direction():
    model, _ = tiny_causal_lm()
    model = get_peft_model(model, make_config("svdlora", r=3))
    layer = preference_layers(model)[0]
    r, x = 3, torch.randn(4, layer.in_features)
    for i, objective in enumerate(OBJECTIVES):
        set_preference(model, {name: float(name == objective) for name in OBJECTIVES})
        with torch.no_grad():
            before = layer(x)
            own = layer.svdlora_U["default"].weight[:, r + i].clone()
            for j in range(len(OBJECTIVES)):  # perturb each objective's singular vectors in turn
                layer.svdlora_U["default"].weight[:, r + j] += 1.0
                changed = not torch.allclose(layer(x), before)
                layer.svdlora_U["default"].weight[:, r + j] -= 1.0
                assert changed == (j == i)
            # and the α part of ΔW is exactly that one rank-1 direction, s · u_i v_iᵀ
            core = layer.svdlora_core["default"]
            shared = (
                layer.svdlora_U["default"].weight[:, :r]
                * core.sigma
                @ layer.svdlora_V["default"].weight[:r]
            )
            alpha_part = layer.get_delta_weight("default") / layer.scaling["default"] - shared
            expected = core.pref_scale * torch.outer(own, layer.svdlora_V["default"].weight[r + i])
            torch.testing.assert_close(alpha_part, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_default_init_starts_as_the_base_model(kind):
    base, tokenizer = tiny_causal_lm()
    batch = tokenizer(["some text"], return_tensors="pt")
    expected = logits(base, batch)
    model = get_peft_model(copy.deepcopy(base), make_config(kind, init_weights=True))
    torch.testing.assert_close(logits(model, batch, pref=[0.5, 0.5]), expected)


# --- PEFT integration: save / load, merge ---------------------------------------------------


def test_save_and_load_give_identical_logits(adapted, tmp_path):
    kind, which, model, _, batch = adapted
    set_preference(model, [0.6, 0.4])
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == kind.upper() and saved["objectives"] == OBJECTIVES
    fresh, _ = base_model(which)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert objectives_of(loaded) == tuple(OBJECTIVES)
    with pytest.raises(PreferenceNotSetError):  # α is not part of the checkpoint
        logits(loaded, batch)
    set_preference(loaded, [0.6, 0.4])
    assert torch.equal(logits(loaded, batch), expected)


def test_merged_model_equals_unmerged_at_that_alpha(adapted, tmp_path):
    _, _, model, tokenizer, batch = adapted
    alpha = {"helpful": 0.35, "harmless": 0.65}
    expected = logits(model, batch, pref=alpha)
    merged = merge_at_preference(model, alpha)
    assert not any(isinstance(m, PreferenceLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path)  # a normal checkpoint
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_model(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-4, atol=1e-4)


def test_merge_unmerge_round_trip_and_alpha_is_locked_while_merged():
    base, tokenizer = tiny_causal_lm()
    batch = tokenizer(["a b c"], return_tensors="pt")
    base_logits = logits(base, batch)
    model = get_peft_model(base, make_config("pblora"))
    set_preference(model, [0.5, 0.5])
    expected = logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge it before changing"):
        set_preference(model, [1.0, 0.0])
    model.unmerge_adapter()
    set_preference(model, [1.0, 0.0])
    assert not torch.allclose(logits(model, batch), expected)  # unmerged: the new α applies
    with model.disable_adapter():  # unmerging restored the base weights exactly enough
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_config_defaults_targets_and_errors(kind):
    config = (
        PBLoraConfig(objectives=OBJECTIVES)
        if kind == "pblora"
        else SVDLoraConfig(objectives=OBJECTIVES)
    )
    model = get_peft_model(tiny_causal_lm()[0], config)
    targeted = {name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names}
    assert targeted == {"q_proj", "k_proj", "v_proj"}  # the references adapt q/k/v
    if kind == "pblora":
        assert (config.r1, config.r2, config.lora_alpha, config.scaling) == (4, 4, 8, 2.0)
    custom = get_peft_model(
        tiny_causal_lm()[0], make_config(kind, target_modules=["o_proj", "down_proj"])
    )
    assert {n.rsplit(".", 1)[-1] for n in custom.base_model.targeted_module_names} == {
        "o_proj",
        "down_proj",
    }
    # only adapter weights train, and their names carry ".default." (what TRL looks for)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with pytest.raises(ValueError, match="objective names"):
        make_config(kind, objectives=None)
    with pytest.raises(ValueError, match="unique"):
        make_config(kind, objectives=["a", "a"])


# --- generation ----------------------------------------------------------------------------


def test_generate_with_per_row_alpha_and_expansion():
    base, tokenizer = tiny_causal_lm()
    model = get_peft_model(base, make_config("pblora")).eval()
    batch = tokenizer(
        ["Hi", "Tell me more"], return_tensors="pt", padding=True, padding_side="left"
    )
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = model.generate(**batch, pref=rows, **common)
    for i in range(2):
        alone = model.generate(**batch, pref=rows[i], **common)
        assert torch.equal(together[i], alone[i])
    for extra in (dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)):
        together = model.generate(**batch, pref=rows, **common, **extra)
        width = extra.get("num_return_sequences", 1)
        assert together.shape[0] == 2 * width
        for i in range(2):  # each prompt's beams ran with that prompt's own α
            alone = model.generate(**batch, pref=rows[i], **common, **extra)
            assert torch.equal(
                together[i * width : (i + 1) * width], alone[i * width : (i + 1) * width]
            )
    torch.manual_seed(0)
    sampled = model.generate(
        **batch,
        pref=rows,
        do_sample=True,
        num_return_sequences=3,
        max_new_tokens=4,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert sampled.shape[0] == 6


def test_half_precision_adapter_keeps_alpha_exact_and_merges():
    base, tokenizer = tiny_causal_lm()
    model = get_peft_model(base, make_config("pblora")).to(torch.bfloat16).eval()
    set_preference(model, [0.1, 0.9])
    assert get_preference(model).to_dict() == {"helpful": 0.1, "harmless": 0.9}  # not bf16-rounded
    batch = tokenizer(["a b c"], return_tensors="pt")
    expected = logits(model, batch).float()
    merged = merge_at_preference(model, [0.1, 0.9])
    torch.testing.assert_close(logits(merged, batch).float(), expected, rtol=0.05, atol=0.05)


# --- training paths ------------------------------------------------------------------------


def adapter_gradients(model, batch):
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_with_gradient_checkpointing_equal_those_without(kind, which):
    base, tokenizer = base_model(which)
    model = get_peft_model(base, make_config(kind))
    model.train()
    batch = tokenizer(["The cat sat on the mat and looked around."], return_tensors="pt")
    set_preference(model, [0.3, 0.7])
    plain = adapter_gradients(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert model.base_model.model.is_activation_checkpointing
    checkpointed = adapter_gradients(model, batch)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain.values())
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**batch, pref=[0.5, 0.5])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_trains_one_step_with_finite_gradients(kind, bits, tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    base, tokenizer = tiny_causal_lm()
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized, _ = load_model(tmp_path, quantization_config=quantization)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    model = get_peft_model(quantized, make_config(kind))
    layer = preference_layers(model)[0]
    assert "bitsandbytes" in type(layer.base_layer).__module__
    set_preference(model, [0.4, 0.6])
    batch = tokenizer(["Quantized bases train adapters too."], return_tensors="pt")
    # weight_decay=0: only a gradient can move a parameter, so "changed" proves training
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def test_import_align_alone_registers_the_tuners_for_from_pretrained(tmp_path):
    import subprocess
    import sys

    model, tokenizer = tiny_causal_lm()
    get_peft_model(model, make_config("pblora")).save_pretrained(tmp_path / "adapter")
    script = f"""
import align, torch
from peft import PeftModel
from align.testing import tiny_causal_lm
base, tok = tiny_causal_lm()
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
align.adapters.set_preference(model, "helpful=0.5,harmless=0.5")
print(type(model.base_model).__name__, model(**tok(["hi"], return_tensors="pt")).logits.shape)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PBLoraModel" in result.stdout


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_pref_keyword_and_merge_through_every_peft_wrapper(task_type):
    """PeftModel and PeftModelForCausalLM (what TRL users get) both route pref= to the layers."""
    base, tokenizer = tiny_causal_lm()
    model = get_peft_model(base, make_config("svdlora", task_type=task_type)).eval()
    assert type(model).__name__ == ("PeftModelForCausalLM" if task_type else "PeftModel")
    batch = tokenizer(
        ["Hi", "Tell me more"], return_tensors="pt", padding=True, padding_side="left"
    )
    set_preference(model, [0.2, 0.8])
    expected = logits(model, batch)
    set_preference(model, [1.0, 0.0])
    torch.testing.assert_close(logits(model, batch, pref=[0.2, 0.8]), expected)
    out = model.generate(
        **batch,
        pref=[[1.0, 0.0], [0.0, 1.0]],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    merged = model.merge_and_unload(preference=[0.2, 0.8])
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-4, atol=1e-5)


def test_pblora_theta_init_fan_in_m_or_parms_fan_in_r2_squared():
    """Θ is (r2², m): 'fan_in_m' draws U(±1/√m), PARM's 'parm' U(±1/r2) (its Θ is stored (m, r2²))."""
    import math

    from align.adapters.pblora.layer import PBLoraCore

    torch.manual_seed(0)
    r2, m = 4, 2
    for init, bound in (("fan_in_m", 1 / math.sqrt(m)), ("parm", 1 / r2)):
        thetas = torch.cat(
            [PBLoraCore(4, r2, m, init).theta.detach().flatten() for _ in range(200)]
        )
        assert thetas.abs().max() <= bound
        assert thetas.abs().max() > 0.98 * bound  # the whole interval is used
        assert thetas.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform
    with pytest.raises(ValueError, match="theta_init"):
        PBLoraConfig(objectives=["a", "b"], theta_init="xavier")
    config = PBLoraConfig(objectives=["a", "b"], theta_init="parm")
    assert config.to_dict()["theta_init"] == "parm"  # saved with the adapter
