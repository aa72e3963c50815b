"""Pareto merging: one compact artifact from which any α gives a merged model.

Chen & Kwok, "Pareto Merging: Multi-Objective Optimization for Preference-Aware Model Merging",
ICML 2025. Instead of one merge per preference, learn a base merge plus a small α-dependent
low-rank tensor per weight matrix, once; any α then yields a model in seconds, without the
original models.

Structure (our choice, a Tucker-2 tensor contracted with α along its third mode)
    For every weight matrix W (2-D, both sides larger than the rank r):

        W(α) = W_0 + U · C(α) · Vᵀ,     C(α) = Σ_k α_k C_k

    * W_0 = the base merge at a fixed preference (default uniform; any registered method, e.g.
      task arithmetic or TIES) — α-independent, stored once, as in the paper;
    * U (out × r), V (in × r): orthonormal bases of the top-r left / right singular subspaces of
      the residuals R_k = θ_k − W_0 (the K residuals side by side for U, stacked for V; a
      seeded randomized SVD), fixed after the streaming pass;
    * C_k (r × r per model): the trained core. An α-independent core C_0 would be redundant:
      Σ α_k = 1 folds it into the C_k.

    Per matrix that is r(out + in) + K r² numbers. Tensors that are not such matrices (norm
    weights, biases) are small and are stored for every model and interpolated exactly,
    Σ_k α_k θ_k. The paper trains U and V too; fixing them to the residuals' principal
    subspaces is what makes the data-free objective below exact in r × r space, so training
    needs neither the models nor the data in memory, only one streaming pass.

Data-free objective (the paper's): the squared distance of θ(α) to each fine-tuned model,
    D_j(α) = Σ_matrices ‖W_0 + U C(α) Vᵀ − θ_j‖² + Σ_small ‖Σ_k α_k θ_k − θ_j‖²
           = Σ_m [ ‖R_j‖² − 2⟨Uᵀ R_j V, C(α)⟩ + ‖C(α)‖² ] + (quadratic in α)
    (U, V orthonormal), divided by one common scale (the mean D_j at the base merge), so
    D̂_j(W_0) ≈ 1. Each step draws α ~ Dirichlet (``sample_preferences``) and minimises
    agg(D̂(α), α) with a loss-level scalarization of :mod:`align.mograd` (linear Σ α_j D̂_j or
    smooth Tchebycheff). For the linear scalarization the optimum is known in closed form —
    C_k = Uᵀ R_k V, the projection of each residual — which the tests use as an oracle.

Data-based objective (optional): ``entropy_weight`` γ > 0 adds γ · H_j(α), the mean entropy
of the merged model's next-token distribution on unlabeled prompts of objective j (AdaMerging's
surrogate, used by the paper with unlabeled data). It needs forward passes through the live
merged model, so the base merge is then held in memory.

Artifact (a folder)
    * ``model.safetensors`` (+ index when sharded), ``config.json``, tokenizer files: the base
      merge W_0 as a normal Hugging Face checkpoint (loadable as it is);
    * ``pareto_factors.safetensors``: ``{name}.U``, ``{name}.V``, ``{name}.C`` (K × r × r) per
      matrix, ``{name}.stack`` (K × shape) per small tensor, and the data-free objective's
      constants (``{name}.Q``, ``{name}.c``, ``__small_gram__``) so the artifact can report
      D_j(α) for any α without the models;
    * ``pareto_merge.json``: format, objective names (α order), rank, base method and
      preference, scalarization, training record, and which tensors are which.

Registered as the merge method ``pareto`` (:class:`ParetoMerging`): a config with ``models``
trains the artifact (options: the fields of :class:`ParetoMergeOptions`) into OUT; a config
with ``artifact: FOLDER`` and a preference or a sweep materialises checkpoints from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.files import read_json, read_safetensors_header
from align.io import atomic_directory
from align.merging.base import Merge, tensor_seed
from align.merging.checkpoint_io import (
    Checkpoint,
    OutputTensor,
    StreamingWriter,
    copy_side_files,
    dtype_from_name,
    read_stack,
    write_merge_info,
)
from align.merging.engine import MergeInputs, copy_inputs_side_files, open_inputs, plan_outputs
from align.merging.registry import get_merge_method, register_merge_method
from align.merging.sweeps import input_signature, sweep_grid, write_sweep
from align.preference import Preference, sample_preferences

logger = logging.getLogger(__name__)

FORMAT = "align-pareto-merge"
FORMAT_VERSION = 1
ARTIFACT_INFO = "pareto_merge.json"
FACTORS_FILE = "pareto_factors.safetensors"
SMALL_GRAM = "__small_gram__"


@dataclass
class ParetoMergeOptions:
    """How to build the artifact; every field is also a key of a merge config's parameters."""

    base_method: str = "task_arithmetic"
    base_parameters: dict[str, Any] = field(default_factory=dict)
    #: "uniform" or one α (dict / vector) at which the α-independent base merge W_0 is taken.
    base_preference: Any = "uniform"
    rank: int = 8
    scalarization: str = "smooth_tchebycheff"
    scalarization_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 500
    lr: float = 0.05
    #: α drawn per step (Dirichlet(concentration · 1)).
    preferences_per_step: int = 8
    concentration: float = 1.0
    seed: int = 0
    #: randomized-SVD power iterations for U and V.
    svd_iterations: int = 4
    #: γ of the data-based entropy term (0: data-free).
    entropy_weight: float = 0.0
    #: unlabeled prompts: one list for all objectives, or {objective: [prompts]}.
    prompts: Any = None
    entropy_max_length: int = 64
    #: α per step that also get the (costly) entropy forward passes.
    entropy_preferences_per_step: int = 1
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        for name in (
            "steps",
            "preferences_per_step",
            "svd_iterations",
            "entropy_max_length",
            "entropy_preferences_per_step",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.preferences_per_step < 1:
            raise ValueError("preferences_per_step must be >= 1")
        for name in ("lr", "concentration"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not (isinstance(self.entropy_weight, int | float) and self.entropy_weight >= 0):
            raise ValueError(f"entropy_weight must be >= 0, got {self.entropy_weight!r}")
        if self.entropy_weight > 0 and not self.prompts:
            raise ValueError(
                "entropy_weight > 0 needs prompts (unlabeled texts) to measure entropy on"
            )
        from align.mograd import LossAggregator, get_aggregator

        aggregator = get_aggregator(self.scalarization, **self.scalarization_options)
        if not isinstance(aggregator, LossAggregator):
            raise ValueError(
                f"scalarization {self.scalarization!r} is a gradient-level method; Pareto merging "
                f"takes a loss-level one (linear, tchebycheff, smooth_tchebycheff)"
            )
        get_merge_method(self.base_method, **self.base_parameters)  # validates the options

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ParetoMergeOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Pareto merging options {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


# --- pass 1: stream the inputs once -------------------------------------------------------------


def _principal_bases(residuals: torch.Tensor, rank: int, seed: int, iterations: int):
    """Orthonormal U (out × r) and V (in × r) spanning the residuals' top singular subspaces."""
    k, out, inp = residuals.shape
    wide = residuals.permute(1, 0, 2).reshape(out, k * inp)  # [R_1 … R_K]
    tall = residuals.reshape(k * out, inp)  # [R_1; …; R_K]
    if out * k * inp <= 1 << 16:  # tiny: the exact SVD is cheap
        u = torch.linalg.svd(wide, full_matrices=False).U
        v = torch.linalg.svd(tall, full_matrices=False).Vh.T
        return u[:, :rank].contiguous(), v[:, :rank].contiguous()
    q = min(rank + 8, out, inp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(wide, q=min(q, k * inp), niter=iterations)
        _, _, v = torch.svd_lowrank(tall, q=min(q, k * out), niter=iterations)
    return u[:, :rank].contiguous(), v[:, :rank].contiguous()


@dataclass
class _Collected:
    low_rank: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    small_gram: torch.Tensor | None = None


def _collect(
    inputs: MergeInputs, options: ParetoMergeOptions, folder: Path, dtype: torch.dtype | None
) -> _Collected:
    base_method = get_merge_method(options.base_method, **options.base_parameters)
    if base_method.needs_base and inputs.base is None:
        raise ValueError(f"base method {base_method.name!r} needs a base_model")
    if not base_method.needs_base and inputs.base is not None:
        raise ValueError(f"base method {base_method.name!r} uses no base_model; remove it")
    if options.base_preference == "uniform":
        base_alpha = Preference.uniform(inputs.objectives)
    else:
        base_alpha = Preference.coerce(options.base_preference, inputs.objectives)
    k = len(inputs.models)
    plan = plan_outputs(inputs, dtype)
    writer = StreamingWriter(
        folder, plan, metadata={"merged_by": "align", "merge_method": "pareto_base"}
    )
    found = _Collected(small_gram=torch.zeros(k, k, dtype=torch.float64))
    try:
        for item in plan:
            name = item.name
            if not inputs.reference.tensors[name].dtype.is_floating_point:
                writer.write(name, inputs.reference.get_tensor(name))
                found.fixed.append(name)
                continue
            stacked = read_stack(inputs.models, name, torch.float32)
            base = inputs.base.get_tensor(name).float() if base_method.needs_base else None
            merged = base_method.merge(name, stacked, base, base_alpha.weights.float())
            del base
            writer.write(name, merged.to(item.dtype))
            if stacked.ndim == 3 and min(stacked.shape[1:]) > options.rank:
                residuals = stacked - merged.to(item.dtype).float()  # relative to what is stored
                del stacked
                u, v = _principal_bases(
                    residuals,
                    options.rank,
                    tensor_seed(options.seed, name, -1),
                    options.svd_iterations,
                )
                projected = torch.einsum("or,kod,ds->krs", u, residuals, v)  # Uᵀ R_k V
                found.factors[f"{name}.U"] = u
                found.factors[f"{name}.V"] = v
                found.factors[f"{name}.Q"] = projected
                found.factors[f"{name}.c"] = residuals.double().pow(2).sum(dim=(1, 2))
                found.low_rank.append(name)
                del residuals
            else:
                found.factors[f"{name}.stack"] = stacked
                centred = (stacked - stacked.mean(0, keepdim=True)).reshape(k, -1).double()
                found.small_gram += centred @ centred.T
                found.small.append(name)
                del stacked
            del merged
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return found


# --- the data-free objective ---------------------------------------------------------------------


class _Objective:
    """D_j(α) for a batch of α, from the per-matrix constants (exact, no model in memory)."""

    def __init__(
        self, names: Sequence[str], factors: Mapping[str, torch.Tensor], small_gram: torch.Tensor
    ):
        self.names = list(names)
        if self.names:
            self.q = torch.stack([factors[f"{n}.Q"].double() for n in self.names])  # (M, K, r, r)
            self.c = torch.stack([factors[f"{n}.c"].double() for n in self.names]).sum(0)  # (K,)
        else:
            self.q = None
            self.c = torch.zeros(small_gram.shape[0], dtype=torch.float64)
        self.gram = small_gram.double()

    def small_terms(self, alphas: torch.Tensor) -> torch.Tensor:
        """Σ_small ‖Σ_k α_k θ_k − θ_j‖² = αᵀGα − 2(Gα)_j + G_jj, shape (B, K)."""
        g_alpha = alphas @ self.gram
        quad = (g_alpha * alphas).sum(-1, keepdim=True)
        return (quad - 2 * g_alpha + torch.diagonal(self.gram)[None]).clamp_min(0)

    def __call__(self, cores: torch.Tensor | None, alphas: torch.Tensor) -> torch.Tensor:
        """D (B, K) for cores C (M, K, r, r) and α (B, K)."""
        total = self.c[None] + self.small_terms(alphas)
        if cores is not None and self.q is not None:
            c_alpha = torch.einsum("bk,mkxy->bmxy", alphas, cores)
            cross = torch.einsum("mjxy,bmxy->bj", self.q, c_alpha)
            square = c_alpha.pow(2).sum(dim=(1, 2, 3))
            total = total - 2 * cross + square[:, None]
        return total.clamp_min(0)


# --- the optional data-based (entropy) objective --------------------------------------------------


class _EntropyTerm:
    """Mean next-token entropy of θ(α) on each objective's unlabeled prompts (H_j(α))."""

    def __init__(
        self,
        folder: Path,
        collected: _Collected,
        objectives: Sequence[str],
        options: ParetoMergeOptions,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = options.prompts
        if isinstance(prompts, Mapping):
            missing = [name for name in objectives if name not in prompts]
            if missing:
                raise ValueError(f"prompts name no texts for objectives {missing}")
            per_objective = [list(prompts[name]) for name in objectives]
        else:
            per_objective = [list(prompts)] * len(objectives)
        self.batches = [
            tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=options.entropy_max_length,
            )
            for texts in per_objective
        ]
        params = dict(self.model.named_parameters())
        missing = [n for n in collected.low_rank + collected.small if n not in params]
        if missing:
            raise ValueError(f"checkpoint tensors that are not model parameters: {missing[:5]}")
        self.w0 = {name: params[name].detach() for name in collected.low_rank}
        self.u = {n: collected.factors[f"{n}.U"] for n in collected.low_rank}
        self.v = {n: collected.factors[f"{n}.V"] for n in collected.low_rank}
        self.stack = {n: collected.factors[f"{n}.stack"] for n in collected.small}
        self.names = collected.low_rank

    def __call__(self, cores: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        weights = {}
        a32 = alpha.float()
        for index, name in enumerate(self.names):
            core = torch.einsum("k,kxy->xy", a32, cores[index].float())
            weights[name] = self.w0[name] + self.u[name] @ core @ self.v[name].T
        for name, stacked in self.stack.items():
            weights[name] = torch.tensordot(a32, stacked, dims=1)
        entropies = []
        for batch in self.batches:
            logits = functional_call(
                self.model,
                weights,
                args=(),
                kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            ).logits
            log_p = torch.log_softmax(logits.float(), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            mask = batch["attention_mask"].float()
            entropies.append((entropy * mask).sum() / mask.sum())
        return torch.stack(entropies)


# --- training -------------------------------------------------------------------------------------


def _train(
    collected: _Collected,
    objectives: Sequence[str],
    options: ParetoMergeOptions,
    entropy: _EntropyTerm | None,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    from align.mograd import get_aggregator

    k = len(objectives)
    objective = _Objective(collected.low_rank, collected.factors, collected.small_gram)
    # One common scale: D̂_j = D_j / mean_j D_j(W_0), so the losses start near 1 and keep the
    # Euclidean geometry (a per-objective scale would change which trade-offs are balanced).
    start = objective(None, torch.eye(k, dtype=torch.float64)).diagonal()
    scale = float(objective(None, torch.full((1, k), 1.0 / k, dtype=torch.float64)).mean())
    scale = scale if scale > 0 else 1.0
    record: dict[str, Any] = {"scale": scale, "steps": options.steps}
    if not collected.low_rank:
        return None, record
    m = len(collected.low_rank)
    r = options.rank
    # Adam's step is absolute; parametrise each core in units of its matrix's residual size so
    # one learning rate suits matrices of very different scales.
    unit = objective.q.pow(2).sum(dim=(2, 3)).amax(1).div(r).sqrt().clamp_min(1e-12)  # (M,)
    raw = torch.zeros(m, k, r, r, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, options.steps))
    aggregator = get_aggregator(options.scalarization, **options.scalarization_options)
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    started = time.perf_counter()
    for step in range(options.steps):
        alphas = sample_preferences(
            k, options.preferences_per_step, options.concentration, generator=generator
        )
        cores = raw * unit[:, None, None, None]
        losses = objective(cores, alphas) / scale  # (B, K)
        if entropy is not None:
            extra = torch.zeros_like(losses)
            count = min(options.entropy_preferences_per_step, len(alphas))
            for row in range(count):
                extra[row] = options.entropy_weight * entropy(cores, alphas[row]).double()
            losses = losses + extra
        total = torch.stack([aggregator(losses[b], alphas[b]) for b in range(len(alphas))]).mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        aggregator.observe(losses.detach().mean(0))
        if step % max(1, options.steps // 20) == 0 or step == options.steps - 1:
            history.append({"step": step, "loss": float(total.detach())})
    record.update(
        history=history,
        seconds=round(time.perf_counter() - started, 3),
        start_distances=(start / scale).tolist(),
    )
    return (raw * unit[:, None, None, None]).detach(), record


# --- the artifact ---------------------------------------------------------------------------------


def pareto_merge(
    models: Mapping[str, str | os.PathLike] | MergeInputs,
    out: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    options: ParetoMergeOptions | Mapping[str, Any] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> ParetoArtifact:
    """Build a Pareto-merging artifact in ``out`` (written atomically) and return it.

    ``models`` maps objective names (α order) to checkpoints, as for
    :func:`~align.merging.merge_checkpoints`. One streaming pass reads every input tensor once.
    """
    if not isinstance(options, ParetoMergeOptions):
        options = ParetoMergeOptions.from_mapping(options or {})
    inputs = models if isinstance(models, MergeInputs) else open_inputs(models, base_model)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")
    dtype = None if options.dtype is None else dtype_from_name(options.dtype)
    started = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        collected = _collect(inputs, options, tmp, dtype)
        copy_inputs_side_files(inputs, tmp, dtype)
        pass_seconds = time.perf_counter() - started
        entropy = None
        if options.entropy_weight > 0:
            entropy = _EntropyTerm(tmp, collected, inputs.objectives, options)
        cores, record = _train(collected, inputs.objectives, options, entropy)
        record["streaming_pass_seconds"] = round(pass_seconds, 3)
        tensors = {}
        for index, name in enumerate(collected.low_rank):
            tensors[f"{name}.U"] = collected.factors[f"{name}.U"].float().contiguous()
            tensors[f"{name}.V"] = collected.factors[f"{name}.V"].float().contiguous()
            tensors[f"{name}.C"] = cores[index].float().contiguous()
            tensors[f"{name}.Q"] = collected.factors[f"{name}.Q"].float().contiguous()
            tensors[f"{name}.c"] = collected.factors[f"{name}.c"].double()
        for name in collected.small:
            tensors[f"{name}.stack"] = collected.factors[f"{name}.stack"].contiguous()
        tensors[SMALL_GRAM] = collected.small_gram.double()
        save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": FORMAT})
        options_record = asdict(options)
        options_record["prompts"] = None if options.prompts is None else "<given>"
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "objectives": list(inputs.objectives),
            "rank": options.rank,
            "structure": "W(α) = W_0 + U (Σ_k α_k C_k) Vᵀ; small tensors Σ_k α_k θ_k",
            "options": options_record,
            "tensors": {
                "low_rank": collected.low_rank,
                "interpolated": collected.small,
                "copied": collected.fixed,
            },
            "training": record,
            "models": {name: inputs.sources[name] for name in inputs.objectives},
            "base_model": inputs.sources.get("base"),
        }
        (tmp / ARTIFACT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    logger.info(
        "Pareto-merging artifact written to %s in %.1f s", out, time.perf_counter() - started
    )
    return ParetoArtifact(out)


class ParetoArtifact:
    """A trained Pareto-merging artifact: materialise any α as a checkpoint or a live model."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        info_path = self.folder / ARTIFACT_INFO
        if not info_path.is_file():
            raise ValueError(f"{self.folder} is not a Pareto-merging artifact (no {ARTIFACT_INFO})")
        self.info = read_json(info_path)
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{info_path} is not an {FORMAT} file")
        if self.info.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{info_path} has version {self.info.get('version')}, this align reads {FORMAT_VERSION}"
            )
        self.objectives = tuple(self.info["objectives"])
        self.low_rank = list(self.info["tensors"]["low_rank"])
        self.small = list(self.info["tensors"]["interpolated"])
        self.base = Checkpoint(self.folder, label="pareto base")
        read_safetensors_header(self.folder / FACTORS_FILE)  # truncated: named before reading
        with safe_open(self.folder / FACTORS_FILE, framework="pt") as handle:
            # Factors are small (r(out+in) + K r² per matrix): load them all.
            self.factors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118

    def __repr__(self) -> str:
        return f"ParetoArtifact({str(self.folder)!r}, objectives={self.objectives}, rank={self.info['rank']})"

    def preference(self, value: Any) -> Preference:
        alpha = Preference.coerce(value, self.objectives)
        if alpha.is_batched:
            raise ValueError("materialise one α at a time")
        return alpha

    def delta(self, name: str, alpha: Preference) -> torch.Tensor:
        """U C(α) Vᵀ for one low-rank matrix (float32)."""
        core = torch.einsum("k,kxy->xy", alpha.weights.float(), self.factors[f"{name}.C"])
        return self.factors[f"{name}.U"] @ core @ self.factors[f"{name}.V"].T

    def tensor(
        self, name: str, alpha: Preference, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor ``name`` of θ(α), in the stored dtype."""
        if name in self.small:
            stacked = self.factors[f"{name}.stack"]
            return torch.tensordot(alpha.weights.to(stacked.dtype), stacked, dims=1).to(
                self.base.tensors[name].dtype
            )
        base = self.base.get_tensor(name) if base is None else base
        if name in self.low_rank:
            return (base.float() + self.delta(name, alpha)).to(base.dtype)
        return base

    def state_dict(self, preference: Any) -> dict[str, torch.Tensor]:
        """θ(α) as an in-memory state dict."""
        alpha = self.preference(preference)
        return {name: self.tensor(name, alpha) for name in self.base.names}

    def materialize(
        self,
        preference: Any,
        out: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write θ(α) as a normal HF checkpoint folder (atomically), streaming tensor by tensor."""
        return self.materialize_many(
            [preference], [out], overwrite=overwrite, max_shard_size=max_shard_size
        )[0]

    def materialize_many(
        self,
        preferences: Sequence[Any],
        outs: Sequence[str | os.PathLike],
        *,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
    ) -> list[Path]:
        """Several α in one pass over the artifact's base weights, each folder atomic."""
        alphas = [self.preference(p) for p in preferences]
        outs = [Path(o) for o in outs]
        for out in outs:
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} already exists; pass overwrite=True")
        with _atomic_many(outs, overwrite) as tmps:
            self.write_checkpoints(alphas, tmps, max_shard_size=max_shard_size)
        return outs

    def write_checkpoints(
        self,
        preferences: Sequence[Any],
        folders: Sequence[Path],
        *,
        max_shard_size: int | str = "5GB",
    ) -> None:
        """θ(α) for each α into each existing folder (not atomic: the caller's staging)."""
        alphas = [self.preference(p) for p in preferences]
        plan = [
            OutputTensor(n, self.base.tensors[n].dtype, self.base.tensors[n].shape)
            for n in self.base.names
        ]
        writers = [
            StreamingWriter(
                folder,
                plan,
                max_shard_size=max_shard_size,
                metadata={"merged_by": "align", "merge_method": "pareto"},
            )
            for folder in folders
        ]
        try:
            for item in plan:
                base = None if item.name in self.small else self.base.get_tensor(item.name)
                for alpha, writer in zip(alphas, writers):
                    writer.write(item.name, self.tensor(item.name, alpha, base))
            for folder, writer, alpha in zip(folders, writers, alphas):
                writer.close()
                copy_side_files(self.folder, folder)
                write_merge_info(
                    folder,
                    {
                        "merge_method": "pareto",
                        "artifact": str(self.folder),
                        "objectives": list(self.objectives),
                        "preference": alpha.to_dict(),
                    },
                )
        except BaseException:
            for writer in writers:
                writer.abort()
            raise

    def load_model(self, preference: Any, **kwargs: Any):
        """θ(α) as a live ``AutoModelForCausalLM`` (the base merge loaded, then α applied)."""
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(self.folder, **kwargs)
        self.set_preference(model, preference)
        return model

    @torch.no_grad()
    def set_preference(self, model: torch.nn.Module, preference: Any) -> None:
        """Move a model loaded by :meth:`load_model` to another α, in place, in milliseconds.

        Low-rank matrices change by U (C(α) − C(α_prev)) Vᵀ; small tensors are set to
        Σ_k α_k θ_k. The current α is kept on the model as ``align_pareto_preference``.
        """
        alpha = self.preference(preference)
        previous = getattr(model, "align_pareto_preference", None)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for name in self.low_rank:
            step = alpha.weights.float() - (previous.weights.float() if previous is not None else 0)
            core = torch.einsum("k,kxy->xy", step, self.factors[f"{name}.C"])
            update = self.factors[f"{name}.U"] @ core @ self.factors[f"{name}.V"].T
            params[name].add_(update.to(params[name].dtype))
        for name in self.small:
            stacked = self.factors[f"{name}.stack"]
            params[name].copy_(torch.tensordot(alpha.weights.to(stacked.dtype), stacked, dims=1))
        model.align_pareto_preference = alpha

    def objective_values(self, preferences: Any) -> torch.Tensor:
        """The data-free objectives D_j(α) (squared distances to each model), shape (B, K)."""
        alphas = Preference.coerce(preferences, self.objectives).weights
        alphas = alphas[None] if alphas.ndim == 1 else alphas
        objective = _Objective(self.low_rank, self.factors, self.factors[SMALL_GRAM])
        cores = (
            torch.stack([self.factors[f"{n}.C"].double() for n in self.low_rank])
            if self.low_rank
            else None
        )
        return objective(cores, alphas.double())

    def size_bytes(self) -> dict[str, int]:
        """Bytes of the base merge and of the α-dependent part (factors without the constants)."""
        factors = sum(
            t.numel() * t.element_size()
            for key, t in self.factors.items()
            if key.endswith((".U", ".V", ".C", ".stack"))
        )
        base = sum(info.nbytes for info in self.base.tensors.values())
        return {"base": base, "factors": factors}


@register_merge_method("pareto")
class ParetoMerging(Merge):
    """Pareto merging (Chen & Kwok, ICML 2025): one compact artifact, any α materialised."""

    trains_artifact = True

    @property
    def options(self) -> dict[str, Any]:  # type: ignore[override]
        """The fields of :class:`ParetoMergeOptions` and their defaults."""
        return {
            f.name: f.default if f.default_factory is MISSING else f.default_factory()
            for f in fields(ParetoMergeOptions)
        }

    def check_options(self) -> None:
        ParetoMergeOptions(**self.params)  # every other check, before any work

    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        """A config with ``models`` trains the artifact into ``out``; one with ``artifact:`` and
        a preference or a sweep materialises checkpoints from a trained one."""
        if config.artifact is None:
            options = dict(self.params)
            if options["dtype"] is None:
                options["dtype"] = config.dtype
            artifact = pareto_merge(
                config.models,
                out,
                base_model=config.base_model,
                options=options,
                max_shard_size=config.max_shard_size,
                overwrite=overwrite,
            )
            return [artifact.folder]
        artifact = ParetoArtifact(config.artifact)
        if config.preference is not None:
            return [
                artifact.materialize(
                    config.preference,
                    out,
                    overwrite=overwrite,
                    max_shard_size=config.max_shard_size,
                )
            ]

        def produce(alphas, folders):
            artifact.write_checkpoints(list(alphas), folders, max_shard_size=config.max_shard_size)

        return write_sweep(
            out,
            sweep_grid(config.sweep, artifact.objectives),
            produce,
            merge_method=self.name,
            job={
                "artifact": input_signature(artifact.folder),
                "max_shard_size": config.max_shard_size,
            },
            overwrite=overwrite,
            pass_size=config.pass_size,
        )


class _atomic_many:
    """Enter :func:`atomic_directory` for several targets; all renamed only if all succeed."""

    def __init__(self, targets: Sequence[Path], overwrite: bool):
        import contextlib

        self._stack = contextlib.ExitStack()
        self._targets = targets
        self._overwrite = overwrite

    def __enter__(self) -> list[Path]:
        return [
            self._stack.enter_context(atomic_directory(t, overwrite=self._overwrite))
            for t in self._targets
        ]

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)
