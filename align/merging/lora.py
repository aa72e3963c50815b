"""PEFT LoRA adapters as merge inputs: exact Σ_k α_k ΔW_k, as an adapter or folded into the base.

Each input is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
trained on the same base model. Per module, ΔW_k = s_k B_k A_k with PEFT's scaling
s_k = lora_alpha / r (or lora_alpha / √r with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
honoured). The math, and why A and B must not be averaged separately, is below (registered as
the merge method ``lora``: :class:`LoraInterpolation`).

* ``output="adapter"``: one LoRA adapter whose rank per module is the sum of the inputs' ranks
  (scaling 1 via ``lora_alpha = r`` per module), loadable with ``PeftModel.from_pretrained``.
* ``output="checkpoint"``: the base checkpoint streamed tensor by tensor with
  W + Σ_k α_k ΔW_k folded into every adapted matrix: a plain HF checkpoint.

Adapters may have different ranks and target different modules (a module an adapter does not
adapt has ΔW_k = 0 there). DoRA, LoRA biases and non-LoRA adapters are refused: they are not
linear in ΔW. ``modules_to_save`` copies (full weights) are interpolated linearly.

The math
--------

Exact interpolation of PEFT LoRA adapters: ΔW(α) = Σ_k α_k ΔW_k, with ΔW_k = s_k B_k A_k.

Averaging A and B separately, as the public rewarded-soups LLaMA code does and as PEFT's
``add_weighted_adapter(combination_type="linear")`` does, is not interpolation of the updates:

    (Σ_k α_k B_k)(Σ_j α_j A_j) = Σ_k α_k² B_k A_k + Σ_{k≠j} α_k α_j B_k A_j

has the wrong weights α_k² on each model's own update plus cross terms B_k A_j that neither model
ever learned (A_j's input directions paired with B_k's outputs), and it requires equal ranks.
The exact form stacks the ranks instead — the rank-R adapter, R = Σ_k r_k,

    A = [A_1; A_2; …; A_K]            (R × in)
    B = [α_1 s_1 B_1, …, α_K s_K B_K]  (out × R),  scaling 1

satisfies B A = Σ_k α_k s_k B_k A_k exactly, for any ranks (this is PEFT's ``cat`` combination,
the only exact one). Models with α_k = 0 are left out. The same sum can instead be folded into
the base weights as one dense ΔW per matrix, giving a plain checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from align.files import read_json, read_safetensors_header
from align.io import atomic_directory, content_digest
from align.merging.base import Merge
from align.merging.checkpoint_io import (
    Checkpoint,
    StreamingWriter,
    copy_side_files,
    dtype_from_name,
    output_plan,
    refuse_pickles,
    resolve_checkpoint,
    write_merge_info,
)
from align.merging.registry import register_merge_method
from align.merging.sweeps import input_signature, sweep_grid, write_sweep
from align.merging.validation import MergeInputError
from align.preference import Preference, check_objectives


@register_merge_method("lora", "lora_cat")
class LoraInterpolation(Merge):
    """Σ_k α_k ΔW_k of PEFT LoRA adapters, exactly: ranks concatenated (or dense ΔW folded)."""

    options = {"output": "adapter"}

    def check_options(self) -> None:
        if self.params["output"] not in ("adapter", "checkpoint"):
            raise ValueError(
                f"lora output must be 'adapter' (concatenated-rank LoRA) or 'checkpoint' "
                f"(ΔW folded into the base weights), got {self.params['output']!r}"
            )

    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        return merge_lora_adapters(
            config.models,
            out,
            preference=config.preference,
            sweep=config.sweep,
            output=self.params["output"],
            base_model=config.base_model,
            dtype=config.dtype,
            max_shard_size=config.max_shard_size,
            overwrite=overwrite,
            pass_size=config.pass_size,
        )

    @staticmethod
    def concatenate(
        lora_a: Sequence[Tensor],
        lora_b: Sequence[Tensor],
        scalings: Sequence[float],
        weights: Sequence[float],
    ) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``B A = Σ_k w_k s_k B_k A_k`` (scaling 1); zero weights left out."""
        keep = [k for k, w in enumerate(weights) if float(w) != 0.0]
        if not keep:
            raise ValueError("every weight is zero: nothing to interpolate")
        a = torch.cat([lora_a[k] for k in keep], dim=0)
        b = torch.cat([lora_b[k] * (float(weights[k]) * float(scalings[k])) for k in keep], dim=1)
        return a, b

    @staticmethod
    def dense_delta(
        lora_a: Sequence[Tensor],
        lora_b: Sequence[Tensor],
        scalings: Sequence[float],
        weights: Sequence[float],
    ) -> Tensor:
        """``Σ_k w_k s_k B_k A_k`` as one dense ``out × in`` matrix."""
        delta = None
        for a, b, s, w in zip(lora_a, lora_b, scalings, weights):
            if float(w) == 0.0:
                continue
            term = (b @ a) * (float(w) * float(s))
            delta = term if delta is None else delta + term
        if delta is None:
            raise ValueError("every weight is zero: nothing to interpolate")
        return delta


# --- adapter folders ---------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name (peft.utils.other.get_pattern_key).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    embedding: bool


@dataclass
class LoraAdapter:
    """One adapter folder, read whole (adapters are small)."""

    label: str
    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save copies

    @classmethod
    def load(cls, folder: str | os.PathLike, label: str) -> LoraAdapter:
        folder = Path(folder).expanduser()
        config_path = folder / ADAPTER_CONFIG
        if not config_path.is_file():
            raise MergeInputError(
                [f"{label}: {folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})"]
            )
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            refuse_pickles(folder, label)
            raise MergeInputError([f"{label}: no {ADAPTER_WEIGHTS} in {folder}"])
        config = read_json(config_path)
        read_safetensors_header(
            weights
        )  # truncated or not safetensors: named here, not in safe_open
        problems = []
        if str(config.get("peft_type", "")).upper() != "LORA":
            problems.append(f"{label}: peft_type is {config.get('peft_type')!r}, not LORA")
        if config.get("use_dora"):
            problems.append(
                f"{label}: DoRA adapters are not linear in ΔW and cannot be interpolated exactly"
            )
        if config.get("lora_bias"):
            problems.append(f"{label}: adapters with LoRA biases are not supported")
        if problems:
            raise MergeInputError(problems)
        adapter = cls(label=label, folder=folder, config=config)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                name = key.removeprefix(_PREFIX)
                match = _LORA_KEY.match(name)
                if match:
                    parts.setdefault(match["module"], {})[match["kind"]] = handle.get_tensor(key)
                elif "modules_to_save" in name or name.startswith(
                    tuple(config.get("modules_to_save") or ())
                ):
                    adapter.saved[name] = handle.get_tensor(key)
                else:
                    raise MergeInputError([f"{label}: unexpected tensor {key} in {weights}"])
        for module, kinds in parts.items():
            embedding = "lora_embedding_A" in kinds
            a = kinds.get("lora_embedding_A" if embedding else "lora_A")
            b = kinds.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise MergeInputError([f"{label}: module {module} has only one of its LoRA A/B"])
            r = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
            if a.shape[0] != r:
                raise MergeInputError(
                    [f"{label}: module {module} has rank {a.shape[0]}, its config says {r}"]
                )
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            adapter.modules[module] = LoraModule(
                a=a, b=b, scaling=float(scaling), embedding=embedding
            )
        return adapter


def _check_adapters(adapters: Sequence[LoraAdapter]) -> None:
    problems = []
    ref = adapters[0]
    for other in adapters[1:]:
        for key in ("base_model_name_or_path", "fan_in_fan_out", "task_type"):
            if ref.config.get(key) != other.config.get(key):
                problems.append(
                    f"{key} differs: {ref.config.get(key)!r} in {ref.label}, {other.config.get(key)!r} in {other.label}"
                )
        if set(ref.saved) != set(other.saved):
            problems.append(
                f"modules_to_save differ: {sorted(ref.saved)} in {ref.label}, {sorted(other.saved)} in {other.label}"
            )
    shapes: dict[str, tuple[int, int, bool, str]] = {}
    for adapter in adapters:
        for module, lora in adapter.modules.items():
            dims = (lora.a.shape[1], lora.b.shape[0], lora.embedding, adapter.label)
            seen = shapes.setdefault(module, dims)
            if seen[:3] != dims[:3]:
                problems.append(
                    f"module {module}: {adapter.label} adapts a {dims[1]}×{dims[0]} "
                    f"{'embedding' if dims[2] else 'linear'}, {seen[3]} a {seen[1]}×{seen[0]} "
                    f"{'embedding' if seen[2] else 'linear'}"
                )
        for name, tensor in adapter.saved.items():
            if tuple(tensor.shape) != tuple(ref.saved.get(name, tensor).shape):
                problems.append(
                    f"modules_to_save tensor {name} has another shape in {adapter.label}"
                )
    if problems:
        raise MergeInputError(problems)


def load_adapters(
    models: Mapping[str, str | os.PathLike],
) -> tuple[tuple[str, ...], list[LoraAdapter]]:
    objectives = check_objectives(list(models))
    adapters, problems = [], []
    for name, folder in models.items():
        try:
            adapters.append(LoraAdapter.load(folder, f"{name} ({folder})"))
        except MergeInputError as error:
            problems += error.mismatches
    if problems:
        raise MergeInputError(problems)
    if len(adapters) < 2:
        raise MergeInputError([f"a merge needs at least two adapters, got {len(adapters)}"])
    _check_adapters(adapters)
    return objectives, adapters


def _absolute(path: str | os.PathLike) -> str:
    """A local folder's absolute path; anything else as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _write_adapter(
    adapters: Sequence[LoraAdapter], alpha: Preference, folder: Path, dtype: torch.dtype | None
) -> None:
    weights = alpha.weights.tolist()
    modules = sorted({m for adapter in adapters for m in adapter.modules})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in modules:
        present = [(k, a.modules[module]) for k, a in enumerate(adapters) if module in a.modules]
        used = [(k, lora) for k, lora in present if weights[k] != 0.0]
        if not used:
            continue  # every adapter with this module has weight 0: ΔW = 0, leave it out
        a, b = LoraInterpolation.concatenate(
            [lora.a.float() for _, lora in used],
            [lora.b.float() for _, lora in used],
            [lora.scaling for _, lora in used],
            [weights[k] for k, _ in used],
        )
        out_dtype = dtype or used[0][1].a.dtype
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if used[0][1].embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{_PREFIX}{module}.{kind[0]}"] = a.to(out_dtype).contiguous()
        tensors[f"{_PREFIX}{module}.{kind[1]}"] = b.to(out_dtype).contiguous()
        ranks[module] = a.shape[0]
    for name in adapters[0].saved:
        stacked = torch.stack([adapter.saved[name].float() for adapter in adapters])
        value = torch.tensordot(alpha.weights.float(), stacked, dims=1)
        tensors[_PREFIX + name] = value.to(dtype or adapters[0].saved[name].dtype).contiguous()
    if not ranks:
        raise ValueError("no LoRA module has a non-zero weight")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    config = dict(adapters[0].config)
    # Scaling 1 everywhere: lora_alpha = r per module, no rsLoRA (α_k s_k is already in B).
    config.update(
        r=common,
        lora_alpha=common,
        use_rslora=False,
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != common},
        alpha_pattern={m: r for m, r in ranks.items() if r != common},
    )
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(
        adapters[0].folder,
        folder,
        names=[
            n
            for n in (
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
            )
            if (adapters[0].folder / n).is_file()
        ],
    )


def _fold_into_base(
    adapters: Sequence[LoraAdapter],
    alphas: Sequence[Preference],
    base: Checkpoint,
    folders: Sequence[Path],
    dtype: torch.dtype | None,
    max_shard_size: int | str,
) -> None:
    fan_in_fan_out = bool(adapters[0].config.get("fan_in_fan_out"))
    targets = {}
    for module in {m for adapter in adapters for m in adapter.modules}:
        name = f"{module}.weight"
        if name not in base.tensors:
            raise MergeInputError([f"the base model has no tensor {name} for LoRA module {module}"])
        targets[name] = module
    saved = {}
    for key in adapters[0].saved:
        # "...<module>.modules_to_save.<adapter>.weight" replaces "<module>.weight".
        match = re.match(r"^(?P<module>.+)\.modules_to_save(\.[^.]+)?\.(?P<leaf>[^.]+)$", key)
        if match:
            saved[f"{match['module']}.{match['leaf']}"] = key
    plan = output_plan(base, base, dtype)
    writers = [
        StreamingWriter(
            f,
            plan,
            max_shard_size=max_shard_size,
            metadata={"merged_by": "align", "merge_method": "lora"},
        )
        for f in folders
    ]
    try:
        for item in plan:
            tensor = base.get_tensor(item.name)
            module = targets.get(item.name)
            for alpha, writer in zip(alphas, writers):
                weights = alpha.weights.tolist()
                value = tensor
                if module is not None:
                    used = [
                        (k, a.modules[module])
                        for k, a in enumerate(adapters)
                        if module in a.modules
                    ]
                    delta = (
                        LoraInterpolation.dense_delta(
                            [lora.a.float() for _, lora in used],
                            [lora.b.float() for _, lora in used],
                            [lora.scaling for _, lora in used],
                            [weights[k] for k, _ in used],
                        )
                        if any(weights[k] != 0 for k, _ in used)
                        else None
                    )
                    if delta is not None:
                        # Embedding LoRA and fan-in-fan-out (GPT-2 Conv1D) store ΔW transposed.
                        if used[0][1].embedding or fan_in_fan_out:
                            delta = delta.T
                        value = tensor.float() + delta
                elif item.name in saved:
                    stacked = torch.stack([a.saved[saved[item.name]].float() for a in adapters])
                    value = torch.tensordot(alpha.weights.float(), stacked, dims=1)
                writer.write(item.name, value.to(item.dtype))
        for folder, writer in zip(folders, writers):
            writer.close()
            copy_side_files(base.folder, folder, dtype=dtype)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def merge_lora_adapters(
    models: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    preference: Any = None,
    sweep: int | Any | None = None,
    output: str = "adapter",
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    pass_size: int | None = None,
) -> list[Path]:
    """Interpolate LoRA adapters exactly along α; see the module notes. Returns the folders.

    A sweep is written by :func:`~align.merging.sweeps.write_sweep` (``pass_size`` α per pass;
    an interrupted sweep resumes from the α it had finished)."""
    method = LoraInterpolation(output=output)
    objectives, adapters = load_adapters(models)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")
    if (preference is None) == (sweep is None):
        raise ValueError("give exactly one of preference (one α) or sweep (a grid or a list of α)")
    out_dtype = None if dtype is None else dtype_from_name(dtype)
    base = None
    if method.params["output"] == "checkpoint":
        if base_model is None:
            raise ValueError("folding LoRA updates into a checkpoint needs base_model")
        base = Checkpoint(resolve_checkpoint(base_model), label=f"base ({base_model})")
    # What the inputs contained: a reader can tell whether they still hold what was merged.
    digests = {n: content_digest(p) for n, p in models.items()}

    def produce(alphas: Preference, folders: list[Path]) -> None:
        alphas = list(alphas)
        if base is None:
            for alpha, folder in zip(alphas, folders):
                _write_adapter(adapters, alpha, folder, out_dtype)
        else:
            _fold_into_base(adapters, alphas, base, folders, out_dtype, max_shard_size)
        for alpha, folder in zip(alphas, folders):
            record = {
                "merge_method": "lora",
                "parameters": {**method.params, "dtype": None if dtype is None else str(dtype)},
                "objectives": list(objectives),
                "preference": alpha.to_dict(),
                # Absolute: a sweep run from another folder still finds the inputs (and
                # answers every α in one weighted pass while their digests match).
                "models": {n: _absolute(p) for n, p in models.items()},
                "model_digests": digests,
                "base_model": None if base_model is None else str(base_model),
            }
            write_merge_info(folder, record)

    if preference is not None:
        alpha = Preference.coerce(preference, objectives)
        if alpha.is_batched:
            raise ValueError("preference must be one α; use sweep= for several")
        with atomic_directory(out, overwrite=overwrite) as tmp:
            produce(Preference(alpha.weights[None], objectives), [tmp])
        return [out]
    job = {
        "parameters": {**method.params, "dtype": None if dtype is None else str(dtype)},
        "model_digests": digests,
        "base_model": None if base is None else input_signature(base.folder),
        "max_shard_size": max_shard_size,
    }
    return write_sweep(
        out,
        sweep_grid(sweep, objectives),
        produce,
        merge_method="lora",
        job=job,
        overwrite=overwrite,
        pass_size=pass_size,
    )
