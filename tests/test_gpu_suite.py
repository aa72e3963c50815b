"""The GPU suite cannot rot: ``gpu_suite.py --smoke`` runs every row's code on the CPU with tiny
stand-in models (one subprocess, as a GPU run is launched), and its shapes are the real ones."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "evaluation" / "benchmarks" / "gpu_suite.py"
ROWS = {
    "train.parm_vs_lora",
    "train.parm_run_bf16",
    "train.parm_run_qlora",
    "mograd.ls",
    "mograd.mgda",
    "mograd.gml2o",
    "mograd.fwd_m_bwd",
    *(
        f"decode.{shape}.b{batch}"
        for shape in ("smollm2-135m", "llama-1b", "llama-8b")
        for batch in (1, 8, 32)
    ),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu-suite") / "gpu_suite.json"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    return {row["id"]: row for row in report["rows"]}, report, result.stdout


def test_every_row_is_produced_or_skipped_with_its_reason(smoke):
    rows, report, stdout = smoke
    assert set(rows) == ROWS
    assert report["smoke"] is True and report["environment"]["device"] == "cpu"
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row
        assert row["measured"] and row["result"], row
    # On the CPU only the QLoRA row is skipped, and it says why.
    skipped = {row_id for row_id, row in rows.items() if row["status"] == "skipped"}
    assert skipped == {"train.parm_run_qlora"}
    assert "CUDA" in rows["train.parm_run_qlora"]["result"]
    assert f"rows: {len(ROWS) - 1} ok, 1 skipped, 0 failed" in stdout


def test_the_parm_loss_falls(smoke):
    figures = smoke[0]["train.parm_run_bf16"]["figures"]
    losses = figures["losses"]
    assert figures["loss_falls"] and len(losses) == 8
    assert losses[-1] < 0.95 * losses[0]


def test_each_row_carries_its_figures(smoke):
    rows = smoke[0]
    step = rows["train.parm_vs_lora"]["figures"]
    assert step["parm_step_s"] > 0 and step["lora_step_s"] > 0 and step["ratio"] > 0
    assert step["trainable_parm"] > 0 and step["trainable_lora"] > 0
    for name in ("mgda", "gml2o"):
        assert rows[f"mograd.{name}"]["figures"]["ratio_to_ls"] > 0
        assert rows[f"mograd.{name}"]["figures"]["ratio_to_floor"] > 0
    for row_id in (r for r in ROWS if r.startswith("decode.")):
        figures = rows[row_id]["figures"]
        assert figures["generate_tokens_per_s"] > 0
        assert figures["parm_ratio"] > 0 and figures["genarm_ratio"] > 0


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_suite"]


@pytest.mark.parametrize(
    "shape, parameters",  # the published sizes of SmolLM2-135M, Llama 3.2 1B, Llama 3.1 8B
    [("smollm2-135m", 134_515_008), ("llama-1b", 1_235_814_400), ("llama-8b", 8_030_261_248)],
)
def test_the_gpu_shapes_are_the_real_models_sizes(suite, shape, parameters):
    from align.testing import tiny_tokenizer

    context = suite.Context(torch.device("meta"), False, tiny_tokenizer(), suite.Suite(), None)
    model = suite.random_model(context, shape)  # the GPU path, on the meta device
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert suite.parameter_count(shape, context.tokenizer) == parameters
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_shape_that_does_not_fit_or_comes_too_late_is_skipped_with_the_reason(suite):
    assert suite.memory_shortfall(2**30, None) is None  # the CPU: no limit known
    assert suite.memory_shortfall(2**30, 2**31) is None
    assert suite.memory_shortfall(20 * 2**30, 8 * 2**30) == "needs about 20.0 GiB, 8.0 GiB free"
    assert suite.Suite(budget_s=None).budget_spent() is None
    assert suite.Suite(budget_s=600).budget_spent() is None
    assert "time budget (0 s" in suite.Suite(budget_s=0).budget_spent()
