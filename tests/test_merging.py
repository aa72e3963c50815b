"""Merging: streamed = in-memory for every method, exact LoRA interpolation, atomic output,
one listing error for mismatched inputs, one read per tensor in a sweep, pickles refused, and
Pareto merging (closed-form oracle, materialisation, live models, CLI).

All inputs are tiny random Llamas (2 layers, hidden 64) saved to a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.merging import (
    CheckpointError,
    MergeConfigError,
    MergeInputError,
    ParetoArtifact,
    get_merge_method,
    merge_checkpoints,
    merge_lora_adapters,
    open_inputs,
    pareto_merge,
    parse_merge_config,
)
from align.merging.base import tensor_seed
from align.merging.checkpoint_io import INDEX_NAME, MERGE_INFO, StreamingWriter
from align.merging.sweeps import SWEEP_INFO
from align.metrics import pareto_mask
from align.preference import simplex_grid

OBJECTIVES = ("helpful", "harmless")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _perturbed(tokenizer, seed: int, scale: float = 0.02, low_rank: int | None = None):
    """The base (seed 0) plus a seeded perturbation: a stand-in for a fine-tuned copy.

    ``low_rank`` makes every matrix update rank-``low_rank`` (as a LoRA fine-tune would)."""
    from align.testing import tiny_causal_lm

    model, _ = tiny_causal_lm(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if low_rank is not None and parameter.ndim == 2:
                out, inp = parameter.shape
                left = torch.randn(out, low_rank, generator=generator)
                right = torch.randn(low_rank, inp, generator=generator)
                parameter.add_(scale * left @ right / low_rank**0.5)
            else:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_lm):
    """base, two dense-perturbed copies, two low-rank-perturbed copies (safetensors folders)."""
    root = tmp_path_factory.mktemp("merge_inputs")
    model, tokenizer = tiny_lm
    folders = {"base": _save(model, tokenizer, root / "base")}
    for name, seed in (("helpful", 1), ("harmless", 2)):
        folders[name] = _save(_perturbed(tokenizer, seed), tokenizer, root / name)
        folders[f"{name}_lr"] = _save(
            _perturbed(tokenizer, seed + 10, 0.05, low_rank=2), tokenizer, root / f"{name}_lr"
        )
    return folders


def _state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        merged = {}
        for shard in shards:
            merged.update(load_file(folder / shard))
        return merged
    return load_file(folder / "model.safetensors")


# --- independent reference formulas (not the library's code paths) -----------------------------


def _topk_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * tau.numel()))
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort(descending=True)[:k]] = True
    return torch.where(keep, flat, 0.0).reshape(tau.shape)


def _dare(tau: torch.Tensor, density: float, seed: int, name: str, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(tensor_seed(seed, name, k))
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep, tau, 0.0) / density


def _ties_merge(taus: list[torch.Tensor], alpha: list[float], normalize=True) -> torch.Tensor:
    total = sum(a * t for a, t in zip(alpha, taus))
    sign = torch.where(total >= 0, 1.0, -1.0)
    numerator = sum(torch.where(torch.sign(t) == sign, a * t, 0.0) for a, t in zip(alpha, taus))
    if not normalize:
        return numerator
    denominator = sum(torch.where(torch.sign(t) == sign, a, 0.0) for a, t in zip(alpha, taus))
    return numerator / torch.where(denominator == 0, 1.0, denominator)


def _breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    import numpy as np

    n = tau.numel()
    flat = tau.reshape(-1).numpy()
    order = np.lexsort((np.arange(n), np.abs(flat)))  # by magnitude, then by position
    keep, top = int(density * n), int(gamma * n)
    mask = np.zeros(n, dtype=bool)
    mask[order[n - keep - top : n - top]] = True
    return torch.where(torch.from_numpy(mask).reshape(tau.shape), tau, 0.0)


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _reference(method: str, params: dict, models: list[dict], base: dict, alpha: list[float]):
    out = {}
    lam = params.get("lambda", 1.0)
    for name, b in base.items():
        thetas = [m[name] for m in models]
        taus = [t - b for t in thetas]
        if method == "linear":
            value = sum(a * t for a, t in zip(alpha, thetas))
        elif method == "task_arithmetic":
            value = b + lam * sum(a * t for a, t in zip(alpha, taus))
        elif method == "ties":
            value = b + lam * _ties_merge([_topk_trim(t, params["density"]) for t in taus], alpha)
        elif method == "dare_linear":
            dropped = [
                _dare(t, params["density"], params["seed"], name, k) for k, t in enumerate(taus)
            ]
            value = b + lam * sum(a * t for a, t in zip(alpha, dropped))
        elif method == "dare_ties":
            dropped = [
                _dare(t, params["density"], params["seed"], name, k) for k, t in enumerate(taus)
            ]
            value = b + lam * _ties_merge(dropped, alpha, normalize=False)  # mergekit's default
        elif method == "slerp":
            value = _slerp(alpha[1], thetas[0], thetas[1])
        elif method == "model_stock":
            flat = [t.reshape(-1).double() for t in taus]
            cos = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
            ratio = 2 * cos / (1 + cos)
            value = ratio * sum(a * t for a, t in zip(alpha, thetas)) + (1 - ratio) * b
        elif method in ("breadcrumbs", "breadcrumbs_ties"):
            crumbs = [_breadcrumbs(t, params["density"], params["gamma"]) for t in taus]
            value = b + lam * (
                sum(a * t for a, t in zip(alpha, crumbs))
                if method == "breadcrumbs"
                else _ties_merge(crumbs, alpha, normalize=False)
            )
        out[name] = value
    return out


METHODS = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"density": 0.3, "lambda": 1.2}),
    ("dare_linear", {"density": 0.4, "seed": 3}),
    ("dare_ties", {"density": 0.4, "seed": 3}),
    ("slerp", {}),
    ("model_stock", {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "lambda": 0.9}),
]


@pytest.mark.parametrize(("method", "params"), METHODS, ids=[m for m, _ in METHODS])
def test_streamed_merge_equals_in_memory_formula(checkpoints, tmp_path, method, params):
    alpha = [0.3, 0.7]
    base = None if method in ("linear", "slerp") else checkpoints["base"]
    # A tiny shard limit forces several shards and an index.
    (out,) = merge_checkpoints(
        {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
        tmp_path / "out",
        method=method,
        parameters=params,
        base_model=base,
        preference={"helpful": 0.3, "harmless": 0.7},
        max_shard_size="60KB",
    )
    assert (out / INDEX_NAME).is_file()
    merged = _state(out)
    models = [_state(checkpoints[n]) for n in OBJECTIVES]
    expected = _reference(method, {"seed": 0, **params}, models, _state(checkpoints["base"]), alpha)
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    info = json.loads((out / MERGE_INFO).read_text())
    assert info["objectives"] == list(OBJECTIVES) and info["preference"]["helpful"] == 0.3
    for side in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / side).is_file()


def test_merged_checkpoint_loads_and_keeps_dtype_request(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    (out,) = merge_checkpoints(
        {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
        tmp_path / "bf16",
        method="ties",
        base_model=checkpoints["base"],
        preference=[0.5, 0.5],
        dtype="bfloat16",
    )
    assert all(t.dtype == torch.bfloat16 for t in _state(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_sweep_reads_each_input_tensor_once_and_matches_single_merges(checkpoints, tmp_path):
    inputs = open_inputs(
        {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
        checkpoints["base"],
    )
    folders = merge_checkpoints(
        inputs, tmp_path / "sweep", method="ties", parameters={"density": 0.5}, sweep=10
    )
    assert len(folders) == 11
    for checkpoint in inputs.all_checkpoints():
        assert checkpoint.reads == dict.fromkeys(checkpoint.tensors, 1), checkpoint.label
    sweep = json.loads((tmp_path / "sweep" / SWEEP_INFO).read_text())
    assert [c["preference"]["helpful"] for c in sweep["checkpoints"]] == pytest.approx(
        simplex_grid(2, 10)[:, 0].tolist()
    )
    for index in (0, 3, 10):
        alpha = simplex_grid(2, 10)[index]
        (single,) = merge_checkpoints(
            {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
            tmp_path / f"single{index}",
            method="ties",
            parameters={"density": 0.5},
            base_model=checkpoints["base"],
            preference=alpha,
        )
        a, b = _state(folders[index]), _state(single)
        assert all(torch.equal(a[n], b[n]) for n in a)


# --- LoRA --------------------------------------------------------------------------------------


def _lora_adapter(tiny_lm, folder: Path, r: int, targets: list[str], seed: int, rslora: bool):
    from peft import LoraConfig, get_peft_model

    from align.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(tiny_lm[1], seed=0)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=rslora, init_lora_weights=False
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    dense = peft_model.merge_and_unload().state_dict()
    return {k: v.clone() for k, v in dense.items()}


def test_lora_interpolation_is_the_weighted_sum_of_dense_updates(tiny_lm, tmp_path):
    from peft import PeftModel

    from align.testing import tiny_causal_lm

    base_model, tokenizer = tiny_causal_lm(tiny_lm[1], seed=0)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    _save(base_model, tokenizer, tmp_path / "base")
    # Different ranks, different targets, one with rsLoRA scaling: all exact.
    dense_a = _lora_adapter(tiny_lm, tmp_path / "a", 2, ["q_proj", "v_proj"], 1, False)
    dense_b = _lora_adapter(tiny_lm, tmp_path / "b", 4, ["q_proj", "k_proj", "down_proj"], 2, True)
    alpha = (0.25, 0.75)
    expected = {
        n: base_state[n]
        + alpha[0] * (dense_a[n] - base_state[n])
        + alpha[1] * (dense_b[n] - base_state[n])
        for n in base_state
    }
    models = {"helpful": tmp_path / "a", "harmless": tmp_path / "b"}

    (adapter,) = merge_lora_adapters(models, tmp_path / "cat", preference=alpha)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # q_proj has rank 6, the others 2 or 4
    loaded = PeftModel.from_pretrained(tiny_causal_lm(tiny_lm[1], seed=0)[0], adapter)
    merged = loaded.merge_and_unload().state_dict()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    (folded,) = merge_lora_adapters(
        models,
        tmp_path / "dense",
        preference=alpha,
        output="checkpoint",
        base_model=tmp_path / "base",
    )
    state = _state(folded)
    for name in state:
        torch.testing.assert_close(state[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # Why not average A and B separately: the cross terms make it differ from Σ α_k ΔW_k.
    from safetensors.torch import load_file as load

    a = load(tmp_path / "a" / "adapter_model.safetensors")
    b = load(tmp_path / "b" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    # Pad the rank-2 adapter to rank 4 so that separate averaging is even defined.
    a_a = torch.cat([a[key.format("A")], torch.zeros(2, a[key.format("A")].shape[1])])
    a_b = torch.cat([a[key.format("B")], torch.zeros(a[key.format("B")].shape[0], 2)], dim=1)
    averaged = (0.25 * a_b + 0.75 * b[key.format("B")]) @ (0.25 * a_a + 0.75 * b[key.format("A")])
    exact = (
        0.25 * a[key.format("B")] @ a[key.format("A")]
        + 0.75 * b[key.format("B")] @ b[key.format("A")]
    )
    assert not torch.allclose(averaged, exact, atol=1e-3)


# --- atomicity ---------------------------------------------------------------------------------


def test_exception_in_the_writer_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = StreamingWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        return original(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", failing)
    with pytest.raises(OSError, match="injected"):
        merge_checkpoints(
            {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
            tmp_path / "out",
            method="linear",
            sweep=4,
        )
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder remains


def test_merge_killed_mid_write_leaves_nothing_that_looks_complete(checkpoints, tmp_path):
    ready = tmp_path / "ready"
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from align.merging import merge_checkpoints
        from align.merging.checkpoint_io import StreamingWriter

        original = StreamingWriter.write
        def slow(self, name, tensor):
            original(self, name, tensor)
            self._handle.flush()
            Path({str(ready)!r}).touch()
            time.sleep(60)  # killed here, with a shard half written
        StreamingWriter.write = slow
        merge_checkpoints({{"helpful": {str(checkpoints["helpful"])!r},
                            "harmless": {str(checkpoints["harmless"])!r}}},
                          {str(out)!r}, method="linear", preference=[0.5, 0.5])
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the merge process ended before writing"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ready"]
    # Only the hidden temporary folder, whose half-written shard is never taken for a result.
    assert leftovers and all(p.name.startswith(".out.tmp-") for p in leftovers)
    # A re-run removes the staging folder of the process that is gone, and finishes.
    merge_checkpoints(
        {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
        out,
        method="linear",
        preference=[0.5, 0.5],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]
    assert not any(p.name.startswith(".align-staging") for p in out.iterdir())


def _run_until(script: str, ready: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            raise AssertionError(f"the merge process ended (rc {child.returncode}) before ready")
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return child


def test_sweep_killed_half_way_resumes_from_the_finished_alphas(checkpoints, tmp_path):
    ready, out = tmp_path / "ready", tmp_path / "sweep"
    models = {"helpful": str(checkpoints["helpful"]), "harmless": str(checkpoints["harmless"])}
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from align.merging import engine, merge_checkpoints
        from align.merging.checkpoint_io import StreamingWriter

        calls, original = [0], engine.stream_merge
        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:  # the third α: write one tensor, then wait to be killed
                write = StreamingWriter.write
                def hang(self, name, tensor):
                    write(self, name, tensor)
                    self._handle.flush()
                    Path({str(ready)!r}).touch()
                    time.sleep(60)
                StreamingWriter.write = hang
            return original(*args, **kwargs)
        engine.stream_merge = counted
        merge_checkpoints({models!r}, {str(out)!r}, method="ties",
                          base_model={str(checkpoints["base"])!r}, sweep=4, pass_size=1)
        """
    )
    child = _run_until(script, ready)
    try:
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not out.exists()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".sweep.tmp-")]
    finished = sorted(p for p in staging.iterdir() if (p / MERGE_INFO).is_file())
    assert len(finished) == 2  # two α done, the third half-written in its own staging folder
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in staging.iterdir())
    stamps = {p.name: (p / "model.safetensors").stat() for p in finished}

    from align.merging import engine

    produced = []
    original = engine.stream_merge

    def spy(inputs, method, preferences, folders, **kwargs):
        produced.extend(p.to_dict()["helpful"] for p in preferences)
        return original(inputs, method, preferences, folders, **kwargs)

    engine.stream_merge = spy
    try:
        folders = merge_checkpoints(
            models,
            out,
            method="ties",
            base_model=checkpoints["base"],
            sweep=4,
            pass_size=1,
        )
    finally:
        engine.stream_merge = original
    assert len(folders) == 5 and all(f.is_dir() for f in folders)
    assert sorted(produced) == pytest.approx([0.5, 0.75, 1.0])  # only the α not finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "sweep"]  # no staging left
    for name, before in stamps.items():  # reused as they were, not rewritten
        after = (out / name / "model.safetensors").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(out.glob(".*"))  # no staging marker, job record or partial α inside
    sweep = json.loads((out / SWEEP_INFO).read_text())
    assert [c["folder"] for c in sweep["checkpoints"]] == [f.name for f in folders]
    (single,) = merge_checkpoints(
        models,
        tmp_path / "single",
        method="ties",
        base_model=checkpoints["base"],
        preference=[0.0, 1.0],
    )
    a, b = _state(folders[0]), _state(single)  # a reused α is the right model
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_sweep_interrupted_by_ctrl_c_resumes_in_the_same_process(tmp_path):
    from align.merging import write_sweep
    from align.preference import Preference

    made = []

    def produce(alphas, folders, stop_at=None):
        for alpha, folder in zip(alphas, folders):
            if len(made) == stop_at:
                raise KeyboardInterrupt
            made.append(alpha.to_dict()["a"])
            (folder / MERGE_INFO).write_text(json.dumps(alpha.to_dict()))

    grid = Preference(simplex_grid(2, 3), ("a", "b"))
    job = {"inputs": "x"}
    with pytest.raises(KeyboardInterrupt):
        write_sweep(
            tmp_path / "s",
            grid,
            lambda a, f: produce(a, f, stop_at=2),
            merge_method="m",
            job=job,
            pass_size=1,
        )
    assert not (tmp_path / "s").exists() and len(made) == 2
    made.clear()
    folders = write_sweep(tmp_path / "s", grid, produce, merge_method="m", job=job, pass_size=1)
    assert made == pytest.approx([2 / 3, 1.0])  # the first two α were kept, not redone
    assert len(folders) == 4 and [p.name for p in tmp_path.iterdir()] == ["s"]
    # A different job on the same target does not adopt a left staging folder: it removes it.
    with pytest.raises(KeyboardInterrupt):
        write_sweep(
            tmp_path / "t",
            grid,
            lambda a, f: produce(a, f, stop_at=3),
            **{"merge_method": "m", "job": job, "pass_size": 1},
        )
    made.clear()
    write_sweep(tmp_path / "t", grid, produce, merge_method="m", job={"inputs": "y"})
    assert len(made) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["s", "t"]


def test_a_merge_sweep_resumes_by_content_not_by_modification_time(
    checkpoints, tmp_path, monkeypatch
):
    """An input touched but unchanged (new mtime) keeps the finished α; an input changed in
    place (same size, other bytes, old mtime put back) redoes the sweep from the start."""
    import shutil

    from align.merging import engine

    helpful = tmp_path / "helpful"
    shutil.copytree(checkpoints["helpful"], helpful)
    weights = helpful / "model.safetensors"
    models = {"helpful": str(helpful), "harmless": str(checkpoints["harmless"])}
    produced, original = [], engine.stream_merge

    def sweep(out: Path, stop_after: int | None = None) -> None:
        def spy(inputs, method, preferences, folders, **kwargs):
            if len(produced) == stop_after:
                raise KeyboardInterrupt  # Ctrl-C keeps the staging folder for a re-run
            produced.extend(p.to_dict()["helpful"] for p in preferences)
            return original(inputs, method, preferences, folders, **kwargs)

        produced.clear()
        monkeypatch.setattr(engine, "stream_merge", spy)
        kwargs = {"method": "linear", "sweep": 4, "pass_size": 1}
        if stop_after is None:
            merge_checkpoints(models, out, **kwargs)
        else:
            with pytest.raises(KeyboardInterrupt):
                merge_checkpoints(models, out, **kwargs)

    sweep(tmp_path / "touched", stop_after=2)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # touched, same bytes
    sweep(tmp_path / "touched")
    assert sorted(produced) == pytest.approx([0.5, 0.75, 1.0])  # the two finished α reused

    sweep(tmp_path / "changed", stop_after=2)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    first = 8 + int.from_bytes(data[:8], "little")  # the first byte after the header
    data[first] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert weights.stat().st_size == stat.st_size
    sweep(tmp_path / "changed")
    assert sorted(produced) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # all redone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed", "helpful", "touched"]


def test_stale_staging_is_removed_live_and_unknown_staging_is_kept(tmp_path):
    from align.io import STAGING_MARKER, atomic_directory

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    import socket

    def staging(suffix: str, pid: int | None) -> Path:
        folder = tmp_path / f".out.tmp-{suffix}"
        folder.mkdir()
        (folder / "half.safetensors").write_bytes(b"x" * 100)
        if pid is not None:
            record = {"host": socket.gethostname(), "pid": pid, "start": None}
            (folder / STAGING_MARKER).write_text(json.dumps(record))
        return folder

    dead, live, unknown = staging("a", dead_pid), staging("b", os.getpid()), staging("c", None)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert not dead.exists() and live.exists() and unknown.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["done.txt"]


# --- validation --------------------------------------------------------------------------------


def test_mismatched_inputs_give_one_error_listing_every_mismatch(checkpoints, tmp_path):
    from align.testing import tiny_causal_lm, tiny_tokenizer

    other_tokenizer = tiny_tokenizer(vocab_size=400)
    odd, _ = tiny_causal_lm(other_tokenizer, seed=5, intermediate_size=96)
    _save(odd, other_tokenizer, tmp_path / "odd")
    with pytest.raises(MergeInputError) as caught:
        merge_checkpoints(
            {"helpful": checkpoints["helpful"], "harmless": tmp_path / "odd"},
            tmp_path / "out",
            method="task_arithmetic",
            base_model=checkpoints["base"],
            preference=[0.5, 0.5],
        )
    text = "\n".join(caught.value.mismatches)
    assert "config differs" in text and "intermediate_size" in text and "vocab_size" in text
    assert "model.embed_tokens.weight has shape" in text  # vocabulary
    assert "mlp.up_proj.weight has shape" in text  # architecture
    assert "tokenizer of harmless" in text
    assert len(caught.value.mismatches) >= 8
    assert str(caught.value).count("\n  - ") == len(caught.value.mismatches)
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoints_are_refused(checkpoints, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["helpful"] / "config.json").read_text())
    torch.save(_state(checkpoints["helpful"]), folder / "pytorch_model.bin")
    with pytest.raises(MergeInputError, match="pickle") as caught:
        merge_checkpoints(
            {"helpful": folder, "harmless": checkpoints["harmless"]},
            tmp_path / "out",
            method="linear",
            preference=[0.5, 0.5],
        )
    assert "pytorch_model.bin" in str(caught.value)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        from align.merging import Checkpoint

        Checkpoint(folder)


def test_bad_options_and_preferences_are_clear_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="does not take 'weight'"):
        get_merge_method("ties", weight=0.3)
    with pytest.raises(ValueError, match="density"):
        get_merge_method("dare_ties", density=1.5)
    with pytest.raises(ValueError, match="unknown merge method"):
        get_merge_method("slerpp")
    models = {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]}
    with pytest.raises(ValueError, match="sums to"):
        merge_checkpoints(models, tmp_path / "o", method="linear", preference=[0.5, 0.6])
    with pytest.raises(ValueError, match="uses no base model"):
        merge_checkpoints(
            models, tmp_path / "o", base_model=checkpoints["base"], preference=[0.5, 0.5]
        )
    with pytest.raises(ValueError, match="needs a base_model"):
        merge_checkpoints(models, tmp_path / "o", method="ties", preference=[0.5, 0.5])
    with pytest.raises(MergeConfigError) as caught:
        parse_merge_config(
            {"merge_method": "ties", "models": [{"model": "x", "objective": "a", "weight": 1}]}
        )
    assert "2 problems" in str(caught.value) or "problems" in str(caught.value)
    assert not (tmp_path / "o").exists()


# --- Pareto merging ----------------------------------------------------------------------------


def _distances(state: dict, models: list[dict]) -> list[float]:
    return [
        float(sum((state[n].double() - m[n].double()).pow(2).sum() for n in state)) for m in models
    ]


@pytest.fixture(scope="module")
def linear_artifact(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pareto") / "artifact"
    return pareto_merge(
        {"helpful": checkpoints["helpful_lr"], "harmless": checkpoints["harmless_lr"]},
        folder,
        base_model=checkpoints["base"],
        options={"rank": 4, "scalarization": "linear", "steps": 400, "lr": 0.05},
    )


def test_pareto_linear_reaches_the_closed_form_optimum(linear_artifact, checkpoints):
    # Linear scalarization of squared distances is minimised by C_k = Uᵀ R_k V; with rank-2
    # updates per model and rank 4 ≥ 2 + 2, U C(α) Vᵀ then reproduces every input exactly.
    art = linear_artifact
    for name in art.low_rank:
        torch.testing.assert_close(
            art.factors[f"{name}.C"], art.factors[f"{name}.Q"], rtol=0.05, atol=1e-4
        )
    models = [_state(checkpoints[f"{n}_lr"]) for n in OBJECTIVES]
    gap = _distances(models[0], models[1:])[0]
    for alpha in ([1.0, 0.0], [0.0, 1.0]):
        state = art.state_dict(alpha)
        distances = _distances(state, models)
        own = distances[0] if alpha[0] == 1 else distances[1]
        assert own < 1e-3 * gap
    # The closed-form objective the artifact reports is the real squared distance.
    for alpha in ([0.2, 0.8], [0.5, 0.5]):
        reported = art.objective_values(alpha)[0].tolist()
        assert reported == pytest.approx(_distances(art.state_dict(alpha), models), rel=1e-3)
    sizes = art.size_bytes()
    assert sizes["factors"] < 0.5 * sizes["base"]


def test_pareto_artifact_materialises_checkpoints_and_live_models(linear_artifact, tmp_path):
    from transformers import AutoModelForCausalLM

    art = ParetoArtifact(linear_artifact.folder)  # reloaded from disk: no original models
    assert art.objectives == OBJECTIVES
    out = art.materialize({"helpful": 0.3, "harmless": 0.7}, tmp_path / "m")
    on_disk = _state(out)
    expected = art.state_dict([0.3, 0.7])
    assert all(torch.equal(on_disk[n], expected[n]) for n in expected)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, value in expected.items():  # what transformers loads is θ(α), tensor by tensor
        torch.testing.assert_close(loaded[name], value.float(), rtol=0, atol=0, msg=name)
    model = art.load_model([0.9, 0.1])
    art.set_preference(model, [0.3, 0.7])  # switch α in place
    live = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(live[name], value, rtol=1e-5, atol=1e-6)


def test_pareto_stch_traces_a_front(checkpoints, tmp_path):
    art = pareto_merge(
        {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]},
        tmp_path / "stch",
        base_model=checkpoints["base"],
        options={
            "rank": 4,
            "scalarization": "smooth_tchebycheff",
            "steps": 150,
            "base_method": "ties",
            "base_parameters": {"density": 0.5},
        },
    )
    values = art.objective_values(simplex_grid(2, 10)).numpy()
    # More weight on helpful → closer to the helpful model, further from harmless; the core is
    # linear in α, so near a vertex the distances may flatten, but the points form a front.
    assert values[-1, 0] < values[0, 0] and values[-1, 1] > values[0, 1]
    assert pareto_mask(values, maximize=False).sum() >= 8
    assert art.info["training"]["history"][-1]["loss"] < art.info["training"]["history"][0]["loss"]


def test_pareto_data_based_entropy_objective_trains(checkpoints, tmp_path):
    prompts = {
        "helpful": ["How do I bake bread?", "Explain rain."],
        "harmless": ["Is it safe to swim after eating?", "Say something kind."],
    }
    options = {"rank": 2, "scalarization": "linear", "steps": 6, "prompts": prompts}
    models = {"helpful": checkpoints["helpful"], "harmless": checkpoints["harmless"]}
    with_entropy, data_free = (
        pareto_merge(
            models,
            tmp_path / f"entropy{weight}",
            base_model=checkpoints["base"],
            options={**options, "entropy_weight": weight},
        )
        for weight in (0.5, 0.0)
    )
    assert with_entropy.info["options"]["entropy_weight"] == 0.5
    # Same seed, same α draws: the cores differ only through the entropy term's gradient.
    difference = max(
        float((with_entropy.factors[f"{n}.C"] - data_free.factors[f"{n}.C"]).abs().max())
        for n in with_entropy.low_rank
    )
    scale = max(float(data_free.factors[f"{n}.C"].abs().max()) for n in data_free.low_rank)
    assert difference > 1e-3 * scale
    losses = [h["loss"] for h in with_entropy.info["training"]["history"]]
    free = [h["loss"] for h in data_free.info["training"]["history"]]
    assert losses[0] > free[0]  # the entropy (γ H > 0) is part of the loss it minimised


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_merge_single_sweep_and_pareto(checkpoints, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from align.cli import app

    runner = CliRunner()
    models = [
        {"model": str(checkpoints["helpful"]), "objective": "helpful"},
        {"model": str(checkpoints["harmless"]), "objective": "harmless"},
    ]
    single = tmp_path / "ties.yaml"
    single.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "models": models,
                "base_model": str(checkpoints["base"]),
                "parameters": {"density": 0.5},
                "preference": {"helpful": 0.7, "harmless": 0.3},
            }
        )
    )
    result = runner.invoke(app, ["merge", str(single), str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one" / "model.safetensors").is_file()

    pareto = tmp_path / "pareto.yaml"
    pareto.write_text(
        yaml.safe_dump(
            {
                "merge_method": "pareto",
                "models": models,
                "base_model": str(checkpoints["base"]),
                "parameters": {"rank": 2, "steps": 20},
            }
        )
    )
    result = runner.invoke(app, ["merge", str(pareto), str(tmp_path / "artifact")])
    assert result.exit_code == 0, result.output
    materialise = tmp_path / "materialise.yaml"
    materialise.write_text(
        yaml.safe_dump(
            {
                "merge_method": "pareto",
                "artifact": str(tmp_path / "artifact"),
                "sweep": 2,
            }
        )
    )
    result = runner.invoke(app, ["merge", str(materialise), str(tmp_path / "front")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "front").glob("helpful_*"))) == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "models": models, "sweep": 10}))
    result = runner.invoke(app, ["merge", str(bad), str(tmp_path / "never")])
    assert result.exit_code == 2 and "needs a base_model" in result.output
    assert not (tmp_path / "never").exists()


def test_shipped_recipes_parse():
    from align.merging import load_merge_config

    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/merging/*.yaml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        config = load_merge_config(recipe)
        if config.merge_method not in ("lora", "lora_cat", "pareto"):
            get_merge_method(config.merge_method, **config.parameters)


# --- mergekit as an oracle (installed by the `dev` extra, so `make test` runs it) -------------


def _mergekit_yaml() -> str | None:
    """mergekit's CLI: $MERGEKIT_YAML, next to this Python, or on PATH (a scratch venv works)."""
    import shutil

    for candidate in (
        os.environ.get("MERGEKIT_YAML"),
        str(Path(sys.executable).parent / "mergekit-yaml"),
        shutil.which("mergekit-yaml"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


# (align method, align parameters, mergekit method, mergekit global parameters, per-model
# parameters, whether mergekit gets a base model, α). Deterministic methods only: DARE and DELLA
# draw random masks from another generator, so no two tools agree on them entry by entry.
ORACLE_CASES = [
    ("linear", {}, "linear", {}, {}, False, [0.3, 0.7]),
    ("task_arithmetic", {"lambda": 0.8}, "task_arithmetic", {"lambda": 0.8}, {}, True, [0.3, 0.7]),
    ("ties", {"density": 0.5}, "ties", {}, {"density": 0.5}, True, [0.4, 0.6]),
    ("slerp", {}, "slerp", {"t": 0.35}, {}, "first", [0.65, 0.35]),
    ("model_stock", {}, "model_stock", {}, {}, True, [0.5, 0.5]),
    (
        "breadcrumbs",
        {"density": 0.6, "gamma": 0.1},
        "breadcrumbs",
        {},
        {"density": 0.6, "gamma": 0.1},
        True,
        [0.3, 0.7],
    ),
    (
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.1},
        "breadcrumbs_ties",
        {},
        {"density": 0.6, "gamma": 0.1},
        True,
        [0.3, 0.7],
    ),
    ("dare_ties", {"density": 1.0}, "dare_ties", {}, {"density": 1.0}, True, [0.3, 0.7]),
    # mergekit's multislerp is the normalised chord; the two agree at the midpoint (slerp.py).
    ("multislerp", {}, "multislerp", {}, {}, False, [0.5, 0.5]),
    ("multislerp_task", {}, "multislerp", {}, {}, True, [0.5, 0.5]),
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_methods_match_mergekit(checkpoints, tmp_path, case):
    import yaml

    # A failure, not a skip: a set-up that lost mergekit would silently stop guarding the merges.
    assert _mergekit_yaml() is not None, "mergekit-yaml not found: pip install -e '.[dev]'"

    method, params, theirs, global_params, model_params, with_base, alpha = case
    names = ("helpful", "harmless")
    if with_base == "first":  # mergekit's slerp: t = 0 is its base model, the first here
        config = {
            "merge_method": theirs,
            "base_model": str(checkpoints["helpful"]),
            "models": [{"model": str(checkpoints[n])} for n in names],
        }
    else:
        config = {
            "merge_method": theirs,
            "models": [
                {"model": str(checkpoints[n]), "parameters": {"weight": a, **model_params}}
                if theirs != "model_stock"  # model stock averages uniformly: no weights
                else {"model": str(checkpoints[n])}
                for n, a in zip(names, alpha)
            ],
        }
        if with_base:
            config["base_model"] = str(checkpoints["base"])
    config.update(dtype="float32", parameters=global_params)
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [_mergekit_yaml(), str(tmp_path / "mk.yaml"), str(tmp_path / "mk"), "--no-cuda"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (ours,) = merge_checkpoints(
        {n: checkpoints[n] for n in names},
        tmp_path / "align",
        method=method,
        parameters=params,
        base_model=checkpoints["base"] if with_base is True else None,
        preference=alpha,
    )
    mine, reference = _state(ours), _state(tmp_path / "mk")
    for name in mine:
        torch.testing.assert_close(
            mine[name], reference[name].to(mine[name].dtype), rtol=1e-5, atol=1e-6, msg=name
        )
