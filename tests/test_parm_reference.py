"""PBLoRA folders in the layout of PARM's reference code (align.adapters.pblora.reference).

The reference layout is that of github.com/Baijiong-Lin/PARM (its PEFT 0.10 fork), read from
``peft/src/peft/tuners/pblora/config.py`` (the config fields), ``.../pblora/layer.py``
(``pblora_A`` (r1+r2, in), ``pblora_B`` (out, r1+r2), ``pblora_W1`` (r1, r1), ``pblora_W2``
(obj_num, r2²), a frozen ``pref_vec`` (obj_num,) from ``pref_vec_init``;
``ΔW = s (B[:, :r1] W1 A[:r1] + B[:, r1:] (pref_vec @ W2).view(r2, r2) A[r1:])``, s = lora_alpha
/ r2) and ``peft/src/peft/utils/save_and_load.py`` (the saved keys are those containing
``pblora_``, without the adapter name: ``base_model.model.<module>.pblora_A`` ...; pref_vec is
not saved). The tests write that layout themselves, from those files, not with align's code.
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from align.adapters import PBLoraConfig, set_preference
from align.adapters.loading import load_adapter
from align.adapters.pblora.reference import (
    convert_reference_parm,
    load_reference_parm,
    save_reference_parm,
)
from align.errors import BadFileError
from align.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBJECTIVES = ["harmless", "helpful"]
ALPHAS = [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]]
R1, R2, LORA_ALPHA = 4, 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj"]
# The reference's PeftConfig (peft 0.10) + PBLoraConfig fields: its loader takes no other key.
REFERENCE_FIELDS = {
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "r1", "r2", "obj_num", "pref_vec_init", "target_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform",
    "layers_pattern",
}  # fmt: skip


@pytest.fixture(scope="module")
def batch():
    _, tokenizer = tiny_causal_lm(seed=0)
    return tokenizer(
        ["Hello there, how are you?", "Tell me a joke"], return_tensors="pt", padding=True
    )


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def align_adapter(**overrides):
    settings = dict(objectives=OBJECTIVES, r1=R1, r2=R2, lora_alpha=LORA_ALPHA)
    settings.update(init_weights=False, lora_dropout=0.0, **overrides)  # B random: ΔW ≠ 0
    torch.manual_seed(1)
    return get_peft_model(tiny_causal_lm(seed=0)[0], PBLoraConfig(**settings)).eval()


def adapted_modules(model):
    return [name for name, _ in model.named_modules() if name.split(".")[-1] in TARGETS]


def write_reference_folder(folder, obj_num=2, pref_vec_init=None):
    """A PARM checkpoint as the authors' code saves it (module docstring), random tensors."""
    base = tiny_causal_lm(seed=0)[0]
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name in adapted_modules(base):
        linear = base.get_submodule(name)
        key = f"base_model.model.{name}"
        shapes = {
            "pblora_A": (R1 + R2, linear.in_features),
            "pblora_B": (linear.out_features, R1 + R2),
            "pblora_W1": (R1, R1),
            "pblora_W2": (obj_num, R2 * R2),
        }
        for tensor, shape in shapes.items():
            tensors[f"{key}.{tensor}"] = 0.3 * torch.randn(shape, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    config = {  # train_pref_arm.py's PBLoraConfig, saved by PEFT 0.10's save_pretrained
        "peft_type": "PBLORA", "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None, "task_type": "CAUSAL_LM", "inference_mode": True, "r1": R1, "r2": R2,
        "obj_num": obj_num, "pref_vec_init": pref_vec_init, "target_modules": TARGETS,
        "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05, "fan_in_fan_out": False, "bias": "none",
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def reference_delta(tensors, key, alpha):
    """The reference's ``_get_lora_matrices`` · scaling, for one module."""
    a, b = tensors[f"{key}.pblora_A"], tensors[f"{key}.pblora_B"]
    w1, w2 = tensors[f"{key}.pblora_W1"], tensors[f"{key}.pblora_W2"]
    w2_alpha = (torch.tensor(alpha) @ w2).view(R2, R2)
    delta = b[:, :R1] @ w1 @ a[:R1, :] + b[:, R1:] @ w2_alpha @ a[R1:, :]
    return delta * (LORA_ALPHA / R2)


def test_align_to_reference_and_back_gives_identical_logits_and_tensors(tmp_path, batch):
    model = align_adapter()
    expected = {}
    for alpha in ALPHAS:
        set_preference(model, alpha)
        expected[tuple(alpha)] = logits(model, batch)
    model.save_pretrained(tmp_path / "align")
    save_reference_parm(model, tmp_path / "ref", preference=[0.3, 0.7])

    config = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert set(config) <= REFERENCE_FIELDS  # the authors' PBLoraConfig(**json) accepts it
    assert config["obj_num"] == 2 and config["pref_vec_init"] == [0.3, 0.7]
    assert (config["r1"], config["r2"], config["lora_alpha"]) == (R1, R2, LORA_ALPHA)
    reference = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    original = load_file(tmp_path / "align" / "adapter_model.safetensors")
    assert len(reference) == len(original) == 4 * len(adapted_modules(model))
    for key in [k for k in reference if k.endswith(".pblora_W2")]:
        module = key.removesuffix("pblora_W2")
        assert reference[key].shape == (2, R2 * R2)
        assert torch.equal(reference[key], original[module + "pblora_core.theta"].T)
        assert torch.equal(reference[module + "pblora_A"], original[module + "pblora_A.weight"])
        assert torch.equal(reference[module + "pblora_W1"], original[module + "pblora_core.w1"])

    # The reference's own formula on one layer gives align's ΔW(α).
    name = adapted_modules(model)[0]
    layer = model.get_submodule(name)
    for alpha in ALPHAS:
        torch.testing.assert_close(
            layer.get_delta_weight("default", torch.tensor(alpha)),
            reference_delta(reference, name, alpha),
        )

    convert_reference_parm(tmp_path / "ref", tmp_path / "back", OBJECTIVES)
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    loaded = load_adapter(tiny_causal_lm(seed=0)[0], tmp_path / "back").eval()
    for alpha in ALPHAS:
        set_preference(loaded, alpha)
        assert torch.equal(logits(loaded, batch), expected[tuple(alpha)])

    # From the saved align folder too, and back into a model directly.
    save_reference_parm(tmp_path / "align", tmp_path / "ref2")
    again = load_file(tmp_path / "ref2" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    direct = load_reference_parm(tiny_causal_lm(seed=0)[0], tmp_path / "ref2", OBJECTIVES)
    set_preference(direct.eval(), [0.3, 0.7])
    assert torch.equal(logits(direct, batch), expected[(0.3, 0.7)])


def test_authors_layout_loads_and_equals_the_equivalent_align_adapter(tmp_path, batch):
    tensors = write_reference_folder(tmp_path / "parm", pref_vec_init=[0.5, 0.5])
    loaded = load_reference_parm(tiny_causal_lm(seed=0)[0], tmp_path / "parm", OBJECTIVES).eval()

    # The same adapter built in align by hand: Θ = W2ᵀ, the rest as they are.
    equivalent = align_adapter()
    for name in adapted_modules(equivalent):
        layer, key = equivalent.get_submodule(name), name  # PeftModel names: base_model.model.
        with torch.no_grad():
            layer.pblora_A["default"].weight.copy_(tensors[f"{key}.pblora_A"])
            layer.pblora_B["default"].weight.copy_(tensors[f"{key}.pblora_B"])
            layer.pblora_core["default"].w1.copy_(tensors[f"{key}.pblora_W1"])
            layer.pblora_core["default"].theta.copy_(tensors[f"{key}.pblora_W2"].T)
    name = adapted_modules(equivalent)[-1]
    for alpha in ALPHAS:
        set_preference(loaded, alpha)
        set_preference(equivalent, alpha)
        assert torch.equal(logits(loaded, batch), logits(equivalent, batch))
        torch.testing.assert_close(
            loaded.get_submodule(name).get_delta_weight("default", torch.tensor(alpha)),
            reference_delta(tensors, name, alpha),
        )
    # α is never taken from the file (pref_vec_init): align asks for it.
    assert loaded.peft_config["default"].objectives == OBJECTIVES


def test_wrong_objective_count_is_an_error(tmp_path):
    write_reference_folder(tmp_path / "parm", obj_num=3)
    for objectives in (OBJECTIVES, ["a", "b", "c", "d"], []):
        with pytest.raises(ValueError, match=r"preference dimension is \[3\].*objective name"):
            convert_reference_parm(tmp_path / "parm", tmp_path / "out", objectives)
    assert not (tmp_path / "out").exists()
    convert_reference_parm(tmp_path / "parm", tmp_path / "out", ["a", "b", "c"])


def test_normal_loaders_refuse_the_reference_layout_naming_the_folder(tmp_path):
    folder = tmp_path / "parm-checkpoint"
    write_reference_folder(folder)
    message = rf"{folder}.*PARM's reference code.*convert-parm"
    with pytest.raises(BadFileError, match=message):
        PeftModel.from_pretrained(tiny_causal_lm(seed=0)[0], folder)
    with pytest.raises(BadFileError, match=message):
        load_adapter(tiny_causal_lm(seed=0)[0], folder)
    with pytest.raises(BadFileError, match=message):
        align_adapter().load_adapter(str(folder), adapter_name="other")

    # Forced: config edited into align's (objective names, no obj_num / pref_vec_init); the
    # tensor names still give it away, instead of an identity adapter and a warning.
    config = json.loads((folder / "adapter_config.json").read_text())
    for key in ("obj_num", "pref_vec_init", "fan_in_fan_out", "layers_to_transform"):
        del config[key]
    config.pop("layers_pattern")
    (folder / "adapter_config.json").write_text(json.dumps({**config, "objectives": OBJECTIVES}))
    with pytest.raises(BadFileError, match=rf"{folder}.*pblora_W2.*convert-parm"):
        load_adapter(tiny_causal_lm(seed=0)[0], folder)


def test_cli_convert_parm_both_ways(tmp_path):
    from align.cli import app

    write_reference_folder(tmp_path / "parm")
    runner = CliRunner()
    result = runner.invoke(
        app, ["convert-parm", str(tmp_path / "parm"), str(tmp_path / "align"), "--objective",
              "harmless", "--objective", "helpful"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "align" / "adapter_config.json").read_text())["objectives"] == (
        OBJECTIVES
    )
    result = runner.invoke(app, ["convert-parm", str(tmp_path / "parm"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "0 objective name(s)" in result.output
    result = runner.invoke(
        app, ["convert-parm", "--to-reference", str(tmp_path / "align"), str(tmp_path / "ref")]
    )
    assert result.exit_code == 0, result.output
    original = load_file(tmp_path / "parm" / "adapter_model.safetensors")
    written = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)


def test_writing_refuses_what_the_reference_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="r1 >= 1"):  # its update_layer refuses r1 <= 0
        save_reference_parm(align_adapter(r1=0), tmp_path / "ref")
    with pytest.raises(ValueError, match="one α"):
        save_reference_parm(align_adapter(), tmp_path / "ref", preference=[[0.5, 0.5]] * 2)
    assert not (tmp_path / "ref").exists()
