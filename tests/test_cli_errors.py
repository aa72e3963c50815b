"""Bad inputs end in one ``error: …`` line and a non-zero exit, with no traceback unless asked
for (``--debug`` / ``ALIGN_DEBUG=1``); a normal start shows no third-party noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli import app
from align.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "positive_brief_small.jsonl"


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("ALIGN_DEBUG", raising=False)


def assert_one_error_line(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not raised
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model, a guide with the same tokenizer and one with another tokenizer."""
    root = tmp_path_factory.mktemp("cli-errors")
    made = {}
    for name, tokenizer in (("base", None), ("same", None), ("other", tiny_tokenizer(600))):
        model, tok = tiny_causal_lm(tokenizer, seed=len(made))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        made[name] = root / name
    return made


def write_recipe(folder: Path, data: Path, model: Path, **fields) -> Path:
    recipe = {
        "trainer": "arm",
        "model": str(model),
        "data": {"path": str(data)},
        "args": {"output_dir": str(folder / "run"), "max_steps": 1, "use_cpu": True},
        **fields,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_missing_dataset_file(tmp_path, folders):
    recipe = write_recipe(tmp_path, tmp_path / "missing.jsonl", folders["base"])
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert_one_error_line(result, "missing.jsonl")


def test_a_dataset_without_label_columns(tmp_path, folders):
    rows = [{"prompt": "Hi", "response_0": "Hello!", "response_1": "Go away."}] * 4
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path, data, folders["base"])
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert_one_error_line(result, "preferred_")


def test_a_bad_recipe_value(tmp_path, folders):
    recipe = write_recipe(tmp_path, DATA, folders["base"])
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--set", "args.preference_sampling=sometimes"]
    )
    assert_one_error_line(result, "preference_sampling must be 'batch' or 'pair'")
    # A value of the wrong type would fail inside the optimizer: the field is named at once.
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", "args.learning_rate=fast"])
    assert_one_error_line(result, "'args.learning_rate' must be a number, got 'fast'")


def test_broken_yaml(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("trainer: arm\nargs: [output_dir: x\nmodel: y\n")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    line = assert_one_error_line(result, "broken.yaml", "not valid YAML")
    assert "line " in line
    config = tmp_path / "eval.yaml"
    config.write_text("base: x\nroutes: {kind: base\n")
    result = CliRunner().invoke(app, ["evaluate", str(config)])
    assert_one_error_line(result, "eval.yaml", "not valid YAML")


def test_a_guide_with_another_tokenizer(folders):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--mode",
            "genarm",
            "--base",
            str(folders["base"]),
            "--arm",
            f"helpful={folders['same']}",
            "--arm",
            f"harmless={folders['other']}",
            "--preference",
            "0.5,0.5",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
    )
    assert_one_error_line(result, "do not share a tokenizer")


def test_a_missing_adapter_folder(tmp_path, folders):
    missing = tmp_path / "no-such-adapter"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--base",
            str(folders["base"]),
            "--arm",
            str(missing),
            "--preference",
            "0.5,0.5",
            "--prompt",
            "Hi",
        ],
    )
    assert_one_error_line(result, str(missing))


def test_debug_keeps_the_exception_for_its_traceback(tmp_path, monkeypatch):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("args: [\n")
    result = CliRunner().invoke(app, ["--debug", "train", str(recipe)])
    assert result.exit_code != 0 and type(result.exception).__name__ == "RecipeError"
    monkeypatch.setenv("ALIGN_DEBUG", "1")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert type(result.exception).__name__ == "RecipeError"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGN_DEBUG": "", **env}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=300,
    )


def test_tracebacks_only_with_debug_in_a_real_process(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("args: [\n")
    for command in (["-m", "align.cli", "train"], ["-m", "align.train"]):
        quiet = _run(*command, str(recipe))
        assert quiet.returncode != 0
        assert "Traceback" not in quiet.stderr, quiet.stderr
        assert quiet.stderr.strip().splitlines()[-1].startswith("error: recipe"), quiet.stderr
        assert sum(line.startswith("error:") for line in quiet.stderr.splitlines()) == 1
    loud = _run("-m", "align.cli", "--debug", "train", str(recipe))
    assert loud.returncode != 0 and "Traceback" in loud.stderr + loud.stdout
    loud = _run("-m", "align.train", str(recipe), ALIGN_DEBUG="1")
    assert loud.returncode != 0 and "Traceback" in loud.stderr


NOISE = ("gemm_4bit_forward", "ds_accelerator", "Setting accelerator", "deprecated", "Warning")


def test_a_normal_run_prints_nothing_a_user_cannot_act_on(tmp_path, folders):
    """One training step of a tiny ARM imports the whole stack (TRL, PEFT, bitsandbytes,
    DeepSpeed): besides progress bars, the console says where the adapter went."""
    recipe = write_recipe(
        tmp_path,
        DATA,
        folders["base"],
        args={
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1,
            "objectives": ["positive"],
            "max_length": 64,
            "max_prompt_length": 32,
            "use_cpu": True,
            "bf16": False,
            "report_to": "none",
        },
    )
    result = _run("-m", "align.cli", "train", str(recipe), OMP_NUM_THREADS="1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "adapter saved to" in result.stdout and (tmp_path / "run" / "final").is_dir()
    for noise in NOISE:
        assert noise not in output, output


def test_the_start_up_filters_drop_only_the_known_messages():
    import logging

    import align._quiet  # noqa: F401  installed by `import align`

    for name, starts in align._quiet.QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        for start in starts:
            assert not logger.filter(logger.makeRecord(name, 30, "x", 1, start + " ...", (), None))
        assert logger.filter(logger.makeRecord(name, 30, "x", 1, "a real warning", (), None))
