"""PBLoRA folders in the layout of PARM's reference code, read and written.

The PARM authors' code (github.com/Baijiong-Lin/PARM, a PEFT 0.10 fork: ``peft/src/peft/
tuners/pblora/{config,layer}.py``, ``peft/src/peft/utils/save_and_load.py``) saves the same
adapter as align's PBLoRA, ``ΔW(α) = s (B1 W1 A1 + B2 W2(α) A2)`` with ``s = lora_alpha / r2``,
in another layout. Per adapted module of the file (``...q_proj.`` below):

=====================  =========================  ==========================================
reference tensor       align tensor               relation
=====================  =========================  ==========================================
``pblora_A`` (r1+r2,   ``pblora_A.weight``        equal; rows ``[:r1]`` are A1
in)
``pblora_B`` (out,     ``pblora_B.weight``        equal; columns ``[:r1]`` are B1
r1+r2)
``pblora_W1`` (r1, r1) ``pblora_core.w1``         equal
``pblora_W2`` (m, r2²) ``pblora_core.theta``      transposed: W2(α) = reshape(α W2, r2×r2)
                       (r2², m)                   row-major, = reshape(Θ α) in align
=====================  =========================  ==========================================

Its config has ``obj_num`` (m) and ``pref_vec_init`` where align has ``objectives``: α is a
frozen ``pref_vec`` parameter set from ``pref_vec_init`` when the adapter is built (zeros when
null) and never saved, since the saved keys are those containing ``pblora_``. The objectives have
no names there, so whoever converts names them, in the order of ``pref_vec``.

Such a folder is not loadable by align's loaders as it is (``PBLoraConfig.from_pretrained``
refuses it, see :func:`reference_layout`): loaded by force, none of its tensors would match
align's names and the adapter would silently be the identity.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from align.errors import BadFileError
from align.files import read_json, read_safetensors_header

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# Tensor-name suffixes, reference -> align. W2 is the one stored transposed.
RENAMES = {
    "pblora_A": "pblora_A.weight",
    "pblora_B": "pblora_B.weight",
    "pblora_W1": "pblora_core.w1",
    "pblora_W2": "pblora_core.theta",
}
TRANSPOSED = "pblora_W2"

# Exactly the fields of the reference's PeftConfig + PBLoraConfig: its PEFT 0.10 builds the
# config with ``PBLoraConfig(**json)``, so any other key is a TypeError there.
REFERENCE_FIELDS = (
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "r1", "r2", "obj_num", "pref_vec_init", "target_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform",
    "layers_pattern",
)  # fmt: skip
# Copied as they are in both directions.
SHARED_FIELDS = (
    "base_model_name_or_path", "revision", "task_type", "target_modules", "lora_alpha",
    "lora_dropout", "bias", "modules_to_save",
)  # fmt: skip


def reference_layout(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` holds a PBLoRA adapter in the reference layout, or None if it does not.

    Looks at the config's keys and, should those have been edited into align's, the tensor
    names of the weights file."""
    folder = Path(folder).expanduser()
    config_file = folder / CONFIG
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    if config.get("peft_type") != "PBLORA":
        return None
    if "obj_num" in config or "pref_vec_init" in config:
        return f"{CONFIG} has obj_num / pref_vec_init and no objective names"
    weights = folder / WEIGHTS
    if weights.is_file():
        names = [name for name in read_safetensors_header(weights) if name.endswith(TRANSPOSED)]
        if names:
            return f"{WEIGHTS} has the reference's tensor names ({names[0]})"
    return None


def reference_layout_error(folder: str | os.PathLike, reason: str) -> BadFileError:
    return BadFileError(
        folder,
        f"a PBLoRA adapter in the layout of PARM's reference code ({reason}); align does not "
        f"load it as it is. Convert it: `align convert-parm {folder} NEW_FOLDER --objective "
        f"NAME ...` (one per preference dimension, in pref_vec's order), or load it with "
        f"align.adapters.pblora.reference.load_reference_parm(model, folder, objectives=[...])",
    )


def _load_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_file, weights = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no {CONFIG})")
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} beside its {CONFIG}")
    config = read_json(config_file)
    if config.get("peft_type") != "PBLORA":
        raise BadFileError(
            config_file, f"not a PBLoRA adapter (peft_type {config.get('peft_type')!r})"
        )
    read_safetensors_header(weights)  # a truncated file fails with its name
    return config, load_file(weights)


def _write_folder(dst: Path, config: Any, tensors: dict[str, torch.Tensor]) -> Path:
    """``config``: a dict written as JSON, or a PeftConfig that writes itself."""
    from safetensors.torch import save_file

    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty (not overwritten)")
    dst.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        (dst / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        config.save_pretrained(str(dst))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / WEIGHTS, {"format": "pt"})
    return dst


def _split_key(key: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """``("...q_proj.", "pblora_W2")`` for a key ending in one of ``suffixes``."""
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix)], suffix
    return None


def _rename(
    tensors: dict[str, torch.Tensor], renames: dict[str, str], source: str | Path
) -> dict[str, torch.Tensor]:
    """Tensors renamed by suffix (W2 / Θ transposed); each adapted module must have all four.
    Tensors of neither adapter (modules_to_save, biases) keep their names."""
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, set[str]] = {}
    for key, value in tensors.items():
        split = _split_key(key, list(renames))
        if split is None:
            if "pblora_" in key:
                raise BadFileError(source, f"unexpected PBLoRA tensor {key}")
            out[key] = value
            continue
        module, suffix = split
        modules.setdefault(module, set()).add(suffix)
        transposed = TRANSPOSED in (suffix, renames[suffix])
        out[module + renames[suffix]] = value.T if transposed else value
    if not modules:
        raise BadFileError(source, "holds no PBLoRA tensors")
    for module, found in modules.items():
        if len(found) != len(renames):
            lacking = sorted(set(renames) - found)
            raise BadFileError(source, f"module {module.rstrip('.')} lacks {', '.join(lacking)}")
    return out


def _from_reference(folder: Path, objectives: Sequence[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    from align.adapters.pblora.config import PBLoraConfig

    config, tensors = _load_folder(folder)
    weights = folder / WEIGHTS
    if "obj_num" not in config:
        raise BadFileError(folder / CONFIG, "not in PARM's reference layout (no obj_num)")
    for name, allowed in (("fan_in_fan_out", (None, False)), ("layers_to_transform", (None,))):
        if config.get(name) not in allowed:
            raise BadFileError(folder / CONFIG, f"{name}={config[name]!r} is not supported")
    objectives = list(objectives)
    dims = {int(config["obj_num"])}
    dims |= {v.shape[0] for k, v in tensors.items() if k.endswith("." + TRANSPOSED)}
    if dims != {len(objectives)}:
        raise ValueError(
            f"{folder}: the adapter's preference dimension is {sorted(dims)} (obj_num, rows of "
            f"pblora_W2) but {len(objectives)} objective name(s) were given "
            f"({', '.join(objectives) or 'none'}): name one objective per dimension, in pref_vec's "
            f"order"
        )
    r1, r2 = int(config["r1"]), int(config["r2"])
    for key, value in tensors.items():
        if key.endswith("." + TRANSPOSED) and value.shape[1] != r2 * r2:
            raise BadFileError(
                weights, f"{key} has shape {tuple(value.shape)}, expected (m, {r2 * r2})"
            )
    shared = {name: config[name] for name in SHARED_FIELDS if config.get(name) is not None}
    # theta_init only matters for training from scratch; "parm" records where Θ came from.
    align_config = PBLoraConfig(
        objectives=objectives, r1=r1, r2=r2, theta_init="parm", inference_mode=True, **shared
    )
    return align_config, _rename(tensors, RENAMES, weights)


def convert_reference_parm(
    src: str | os.PathLike, dst: str | os.PathLike, objectives: Sequence[str]
) -> Path:
    """Write the reference-layout PBLoRA folder ``src`` as an align PBLoRA folder ``dst``.

    ``objectives`` name the preference dimensions in the order of the reference's ``pref_vec``
    (e.g. ``["harmless", "helpful"]`` for the authors' ``pref_vec_init = [α_harmlessness,
    α_helpfulness]``). The source's ``pref_vec_init`` (an α) is not carried over: align stores no
    α with an adapter."""
    config, tensors = _from_reference(Path(src).expanduser(), objectives)
    return _write_folder(Path(dst).expanduser(), config, tensors)


def load_reference_parm(
    base_model: Any,
    folder: str | os.PathLike,
    objectives: Sequence[str],
    adapter_name: str = "default",
    **kwargs: Any,
) -> Any:
    """``base_model`` with the reference-layout PBLoRA adapter of ``folder`` (converted in a
    temporary folder, then loaded by :func:`align.adapters.loading.load_adapter`, which checks
    that every tensor came from the file). Set α with ``set_preference`` as for any adapter."""
    from align.adapters.loading import load_adapter

    with tempfile.TemporaryDirectory(prefix="align-parm-") as scratch:
        converted = convert_reference_parm(folder, Path(scratch) / "adapter", objectives)
        return load_adapter(base_model, converted, adapter_name=adapter_name, **kwargs)


def save_reference_parm(
    model_or_folder: Any,
    dst: str | os.PathLike,
    adapter_name: str = "default",
    preference: Any = None,
) -> Path:
    """Write an align PBLoRA adapter (a PeftModel's ``adapter_name``, or a saved folder) in the
    reference layout, loadable by the authors' code.

    ``preference`` (any α align accepts) becomes ``pref_vec_init``, the α the reference applies;
    None leaves it null, which the reference reads as α = 0 (no preference-aware term) until its
    user sets it, as its evaluation script does."""
    from align.preference import Preference

    config, tensors, source = _align_adapter(model_or_folder, adapter_name)
    objectives = config["objectives"]
    if int(config["r1"]) < 1:
        raise ValueError("PARM's reference code needs r1 >= 1 (it refuses r1 = 0)")
    if config.get("exclude_modules"):  # the reference's PEFT 0.10 has no such field
        raise ValueError(
            f"the reference layout has no exclude_modules ({config['exclude_modules']!r})"
        )
    alpha = None
    if preference is not None:
        weights = Preference.coerce(preference, objectives).weights
        if weights.ndim != 1:
            raise ValueError("pref_vec_init is one α, not a batch")
        alpha = [float(w) for w in weights]
    reference = dict.fromkeys(REFERENCE_FIELDS)
    reference.update({name: config.get(name) for name in SHARED_FIELDS})
    reference.update(
        peft_type="PBLORA",
        auto_mapping=config.get("auto_mapping"),
        inference_mode=True,
        r1=int(config["r1"]),
        r2=int(config["r2"]),
        obj_num=len(objectives),
        pref_vec_init=alpha,
        target_modules=_json_targets(config.get("target_modules")),
        fan_in_fan_out=False,
    )
    inverse = {align: ref for ref, align in RENAMES.items()}
    renamed = _rename(tensors, inverse, source)
    return _write_folder(Path(dst).expanduser(), reference, renamed)


def _align_adapter(model_or_folder: Any, adapter_name: str) -> tuple[dict, dict, str | Path]:
    """Config, tensors and (for error messages) where they came from."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder).expanduser()
        reason = reference_layout(folder)
        if reason:
            raise BadFileError(folder, f"already in the reference layout ({reason})")
        config, tensors = _load_folder(folder)
        if not config.get("objectives"):
            raise BadFileError(folder / CONFIG, "not an align PBLoRA config (no objectives)")
        return config, tensors, folder / WEIGHTS
    from peft.utils import get_peft_model_state_dict

    config = model_or_folder.peft_config[adapter_name]
    if config.peft_type != "PBLORA":
        raise ValueError(f"adapter {adapter_name!r} is {config.peft_type}, not PBLoRA")
    state = get_peft_model_state_dict(model_or_folder, adapter_name=adapter_name)
    tensors = {k: v.detach().cpu() for k, v in state.items()}
    return config.to_dict(), tensors, f"adapter {adapter_name!r}"


def _json_targets(targets: Any) -> Any:
    # A config keeps target_modules as a set; JSON (and the reference) want a list.
    return sorted(targets) if isinstance(targets, (set, frozenset, list, tuple)) else targets
