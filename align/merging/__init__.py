"""Merging Hugging Face checkpoints along the preference vector α.

* :func:`merge_checkpoints` — one α or a sweep of α, streamed tensor by tensor from safetensors
  shards with any registered method (:func:`available_merge_methods`: ``linear`` (rewarded
  soups), ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``slerp``,
  ``multislerp``, ``model_stock``, ``della``, ``della_linear``, ``breadcrumbs``,
  ``breadcrumbs_ties``); an interrupted sweep resumes from the α it had finished;
* :func:`merge_lora_adapters` — exact Σ_k α_k ΔW_k of PEFT LoRA adapters (method ``lora``);
* :func:`pareto_merge` — Pareto merging (Chen & Kwok, ICML 2025): a compact artifact from which
  :class:`ParetoArtifact` materialises any α as a checkpoint or a live model;
* :func:`load_merge_config` / :func:`run_merge_config` — the YAML configs of ``align merge``.

Inputs are validated before any work (:class:`MergeInputError` lists every mismatch), pickle
checkpoints are refused, and every output folder is written atomically.
"""

from align.merging.checkpoint_io import MERGE_INFO, Checkpoint, CheckpointError, StreamingWriter
from align.merging.config import (
    MergeConfig,
    MergeConfigError,
    load_merge_config,
    parse_merge_config,
    run_merge_config,
)
from align.merging.engine import MergeInputs, MergeMethod, merge_checkpoints, open_inputs
from align.merging.lora import merge_lora_adapters
from align.merging.pareto import ParetoArtifact, ParetoMergeOptions, pareto_merge
from align.merging.registry import available_merge_methods, get_merge_method, register_merge_method
from align.merging.sweeps import SWEEP_INFO, sweep_preferences, write_sweep
from align.merging.validation import MergeInputError, check_compatible

__all__ = [
    "MERGE_INFO",
    "SWEEP_INFO",
    "Checkpoint",
    "CheckpointError",
    "MergeConfig",
    "MergeConfigError",
    "MergeInputError",
    "MergeInputs",
    "MergeMethod",
    "ParetoArtifact",
    "ParetoMergeOptions",
    "StreamingWriter",
    "available_merge_methods",
    "check_compatible",
    "get_merge_method",
    "load_merge_config",
    "merge_checkpoints",
    "merge_lora_adapters",
    "open_inputs",
    "pareto_merge",
    "parse_merge_config",
    "register_merge_method",
    "run_merge_config",
    "sweep_preferences",
    "write_sweep",
]
