"""Bad inputs end in one ``error: …`` line and a non-zero exit, with no traceback unless asked
for (``--debug`` / ``ALIGN_DEBUG=1``); a normal start shows no third-party noise."""

from __future__ import annotations

import json
import os
import shutil
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


# --- bad files: one error line each, and nothing written -----------------------------------------
#
# Every file align reads, made empty, truncated, garbled or not UTF-8 by the test, handed to the
# command that reads it. Each row: the command, the bad file, what the one `error:` line must
# say. The command must exit 2 with that one line, no traceback, and leave the test's folder as
# it was (no output, no staging folder, no checkpoint).

GARBAGE = bytes(range(128, 256)) * 2  # not UTF-8, not JSON, no safetensors / zip / Parquet header
TRAIN_ARGS = {
    "max_steps": 1,
    "save_steps": 1,
    "max_length": 64,
    "max_prompt_length": 32,
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
}


def _recipe(trainer: str, model: Path, data: Path, output_dir: Path, **args) -> dict:
    return {
        "trainer": trainer,
        "model": str(model),
        "data": {"path": str(data)},
        "args": {**TRAIN_ARGS, "output_dir": str(output_dir), **args},
    }


#: The trained runs: a LoRA ARM, and a PBLoRA PARM with a stateful method (DWA's loss history).
RUNS = {
    "arm": {"trainer": "arm", "objectives": ["positive"]},
    "parm": {
        "trainer": "parm",
        "objectives": ["positive", "brief"],
        "aggregator": "dwa",
        "allow_preference_blind_aggregator": True,
    },
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, folders):
    """Good files to break: the data in every format, one step of each run in RUNS (its
    checkpoint-1 and final adapter), and a copy of a model saved in shards."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("bad-files")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    (root / "pairs.jsonl").write_bytes(DATA.read_bytes())
    (root / "pairs.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_csv(str(root / "pairs.csv"), index=False)
    Dataset.from_list(rows).to_parquet(str(root / "pairs.parquet"))
    for name, settings in RUNS.items():
        args = {key: value for key, value in settings.items() if key != "trainer"}
        recipe = _recipe(settings["trainer"], folders["base"], DATA, root / name, **args)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["train", str(root / f"{name}.yaml")])
        assert result.exit_code == 0, result.output
    model, tokenizer = tiny_causal_lm(seed=1)
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    tokenizer.save_pretrained(root / "sharded")
    return {"root": root, **folders}


# Ways to break a file (each takes its path).
def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


def half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_last_record(path: Path) -> None:
    """Cut in the middle of the last record (CSV: a few bytes into its last quoted field)."""
    data = path.read_bytes().rstrip()
    if path.suffix == ".csv":
        path.write_bytes(data[: data.rfind(b',"') + 5])
    else:
        start = data.rfind(b"\n") + 1
        path.write_bytes(data[: (start + len(data)) // 2])


def latin1(path: Path) -> None:
    """One letter written as Latin-1 (0xe9), the rest left as it was."""
    data = path.read_bytes()
    for old in (b"Explain", b'"none"', b"llama", b"prompt", b"kind"):
        if old in data:
            path.write_bytes(data.replace(old, old[:2] + b"\xe9" + old[3:], 1))
            return
    raise AssertionError(f"nothing to replace in {path}")


def remove(path: Path) -> None:
    path.unlink()


def drop_tensor(path: Path) -> None:
    """The adapter weights without one of their tensors (a valid safetensors file)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path)


def last_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[-1]


def another_method_state(path: Path) -> None:
    import torch

    torch.save({"aggregator": {"weights": torch.ones(2)}}, path)


# Commands: each makes its inputs in the test's folder and returns (arguments, the file to break).
def train_on_data(suffix: str):
    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        data = folder / f"pairs{suffix}"
        shutil.copy(made["root"] / f"pairs{suffix}", data)
        recipe = _recipe("arm", made["base"], data, folder / "run", objectives=["positive"])
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return ["train", str(folder / "recipe.yaml")], data

    return command


def train_on_model(name: str):
    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        shutil.copytree(made["base"], folder / "model")
        recipe = _recipe("arm", folder / "model", DATA, folder / "run", objectives=["positive"])
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return ["train", str(folder / "recipe.yaml")], folder / "model" / name

    return command


def resume(run: str, name: str):
    """Resume the run from its checkpoint-1 (one more step), with ``name`` in it broken."""

    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        checkpoint = folder / "run" / "checkpoint-1"
        shutil.copytree(made["root"] / run / "checkpoint-1", checkpoint)
        recipe = yaml.safe_load((made["root"] / f"{run}.yaml").read_text())
        recipe["args"].update(output_dir=str(folder / "run"), max_steps=2, save_steps=10)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return ["train", str(folder / "recipe.yaml")], checkpoint / name

    return command


def config(command_name: str):
    """A recipe, evaluation config or merge config, written by the test (to be broken)."""

    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        path = folder / "config.yaml"
        path.write_text("prompts: {limit: 2}\n")
        out = [str(folder / "out")] if command_name == "merge" else []
        return [command_name, str(path), *out], path

    return command


def generate_with(run: str, name: str):
    """`align generate` guided by the run's final adapter, with ``name`` in it broken."""

    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        shutil.copytree(made["root"] / run / "final", folder / "adapter")
        mode = ["--mode", "genarm", "--arm", f"positive={folder / 'adapter'}"]
        if run == "parm":
            mode = ["--mode", "parm", "--arm", str(folder / "adapter")]
        preference = "1" if run == "arm" else "0.5,0.5"
        return [
            "generate",
            "--base",
            str(made["base"]),
            *mode,
            "--preference",
            preference,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--output",
            str(folder / "answers.jsonl"),
        ], folder / "adapter" / name

    return command


def generate_from_prompts(name: str):
    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        prompts = folder / name
        texts = ("prompt one", "prompt two")
        lines = [json.dumps({"prompt": p}) if name.endswith(".jsonl") else p for p in texts]
        prompts.write_text("".join(line + "\n" for line in lines))
        return [
            "generate",
            "--base",
            str(made["base"]),
            "--arm",
            str(made["root"] / "parm" / "final"),
            "--preference",
            "0.5,0.5",
            "--prompts-file",
            str(prompts),
            "--output",
            str(folder / "answers.jsonl"),
        ], prompts

    return command


def serve_route(folder: Path, made: dict) -> tuple[list[str], Path]:
    route = folder / "route.yaml"
    route.write_text(f"kind: parm\nadapter: {made['root'] / 'parm' / 'final'}\n")
    return ["serve", "--route", str(route), "--base", str(made["base"])], route


def merge_models(source: str, pick):
    """A linear merge of the base and a copy of ``source``; ``pick`` names the file to break."""

    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        shutil.copytree(made.get(source) or made["root"] / source, folder / "model")
        merge = {
            "merge_method": "linear",
            "models": [
                {"model": str(made["base"]), "objective": "positive"},
                {"model": str(folder / "model"), "objective": "brief"},
            ],
            "preference": {"positive": 0.5, "brief": 0.5},
        }
        (folder / "merge.yaml").write_text(yaml.safe_dump(merge))
        return ["merge", str(folder / "merge.yaml"), str(folder / "out")], pick(folder / "model")

    return command


def merge_lora(name: str):
    """An exact LoRA merge of the ARM's final adapter and a copy of its checkpoint."""

    def command(folder: Path, made: dict) -> tuple[list[str], Path]:
        shutil.copytree(made["root"] / "arm" / "checkpoint-1", folder / "adapter")
        merge = {
            "merge_method": "lora",
            "models": [
                {"model": str(made["root"] / "arm" / "final"), "objective": "positive"},
                {"model": str(folder / "adapter"), "objective": "brief"},
            ],
            "parameters": {"output": "adapter"},
            "preference": {"positive": 0.5, "brief": 0.5},
        }
        (folder / "merge.yaml").write_text(yaml.safe_dump(merge))
        return ["merge", str(folder / "merge.yaml"), str(folder / "out")], folder / "adapter" / name

    return command


# The data rows: every format the loaders read, each broken four ways (Parquet has no text).
DATA_ERRORS = {
    ".jsonl": {
        empty: "empty file (no records)",
        garbage: "not UTF-8 text (byte 0x80 at line 1, column 1)",
        cut_last_record: "not valid JSON Lines (Unterminated string starting at: line 48, column",
        latin1: "not UTF-8 text (byte 0xe9 at line 2, column 15)",
    },
    ".json": {
        empty: "empty file (no records)",
        garbage: "not UTF-8 text (byte 0x80 at line 1, column 1)",
        cut_last_record: "not valid JSON (Unterminated string starting at: line 1, column",
        latin1: "not UTF-8 text (byte 0xe9 at line 1, column ",
    },
    ".csv": {
        empty: "empty file (no records)",
        garbage: "not UTF-8 text (byte 0x80 at line 1, column 1)",
        cut_last_record: "not valid CSV (Error tokenizing data. C error: EOF inside string",
        latin1: "not UTF-8 text (byte 0xe9 at line 3, column 3)",
    },
    ".parquet": {
        empty: "empty file (no records)",
        garbage: "truncated or not a Parquet file (no PAR1 marker at its start)",
        cut_last_record: "truncated or not a Parquet file (no PAR1 marker at its end)",
    },
}
TORCH_ARCHIVE = "truncated or corrupted, not a readable torch.save archive"
NOT_SAFETENSORS = "truncated or not a safetensors file"
INCOMPLETE = "checkpoint-1: incomplete checkpoint, no {} (remove the folder"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
INDEX = "model.safetensors.index.json"


def not_yaml(path: Path) -> None:
    path.write_text("a: [1\nb: 2\n")


def a_list(path: Path) -> None:
    path.write_text("[]")


#: (row id, command, how the file is broken, what the error line says: {file} is the file)
# fmt: off
BAD_FILES = [
    *[(f"data{suffix}-{how.__name__}", train_on_data(suffix), how, "{file}: " + said)
      for suffix, errors in DATA_ERRORS.items() for how, said in errors.items()],
    # recipes, evaluation configs, merge configs
    *[(f"{name}-config-{how.__name__}", config(name), how, "{file}' is " + said)
      for name in ("train", "evaluate", "merge")
      for how, said in ((empty, "empty"),
                        (garbage, "not UTF-8 text (byte 0x80 at line 1, column 1)"),
                        (latin1, "not UTF-8 text (byte 0xe9 at line 1, column 3)"),
                        (not_yaml, "not valid YAML: line 2, column 2"))],
    # the model a recipe trains
    ("model-weights-half", train_on_model("model.safetensors"), half, "{file}: " + NOT_SAFETENSORS),
    ("model-weights-empty", train_on_model("model.safetensors"), empty, "{file}: empty file (expected safetensors weights)"),
    ("model-config-half", train_on_model("config.json"), half, "{file}: not valid JSON ("),
    ("model-config-latin1", train_on_model("config.json"), latin1, "{file}: not UTF-8 text (byte 0xe9 at line "),
    ("model-tokenizer-half", train_on_model("tokenizer.json"), half, "{file}: not valid JSON ("),
    ("model-generation-config-half", train_on_model("generation_config.json"), half, "{file}: not valid JSON ("),
    # adapters that guide decoding: PBLoRA (align's own tuner) and LoRA
    ("parm-weights-half", generate_with("parm", WEIGHTS), half, "{file}: " + NOT_SAFETENSORS),
    ("parm-weights-garbage", generate_with("parm", WEIGHTS), garbage, "{file}: " + NOT_SAFETENSORS),
    ("parm-weights-empty", generate_with("parm", WEIGHTS), empty, "{file}: empty file (expected safetensors weights)"),
    ("parm-weights-missing", generate_with("parm", WEIGHTS), remove, "adapter: no adapter_model.safetensors beside its adapter_config.json"),
    ("parm-weights-missing-a-tensor", generate_with("parm", WEIGHTS), drop_tensor, "{file}: lacks 1 of the adapter's 24 tensors (first base_model.model.model.layers.0.self_attn.k_proj.pblora_A.weight)"),
    ("arm-weights-missing-a-tensor", generate_with("arm", WEIGHTS), drop_tensor, "{file}: lacks 1 of the adapter's 12 tensors (first "),
    ("parm-config-half", generate_with("parm", CONFIG), half, "{file}: not valid JSON ("),
    ("parm-config-empty", generate_with("parm", CONFIG), empty, "{file}: empty file (expected JSON)"),
    ("parm-config-latin1", generate_with("parm", CONFIG), latin1, "{file}: not UTF-8 text (byte 0xe9 at line "),
    ("parm-config-a-list", generate_with("parm", CONFIG), a_list, "{file}: expected a JSON object, got a list"),
    # a route file of align serve
    ("serve-route-latin1", serve_route, latin1, "{file}: not UTF-8 text (byte 0xe9 at line 1, column 3)"),
    ("serve-route-not-yaml", serve_route, not_yaml, "{file}: not valid YAML: line 2, column 2"),
    # prompts files
    ("prompts-latin1", generate_from_prompts("prompts.txt"), latin1, "{file}: not UTF-8 text (byte 0xe9 at line 1, column 3)"),
    ("prompts-cut", generate_from_prompts("prompts.jsonl"), cut_last_record, "{file}: not valid JSON Lines (Unterminated string starting at: line 2, column 12)"),
    ("prompts-empty", generate_from_prompts("prompts.jsonl"), empty, "{file}: empty file (no prompts)"),
    # checkpoints a run resumes from
    ("resume-weights-half", resume("arm", WEIGHTS), half, "{file}: " + NOT_SAFETENSORS),
    ("resume-weights-missing", resume("arm", WEIGHTS), remove, INCOMPLETE.format(WEIGHTS)),
    ("resume-weights-missing-a-tensor", resume("arm", WEIGHTS), drop_tensor, "{file}: lacks 1 of the adapter's 12 tensors"),
    ("resume-adapter-config-missing", resume("arm", CONFIG), remove, INCOMPLETE.format(CONFIG)),
    ("resume-adapter-config-half", resume("arm", CONFIG), half, "{file}: not valid JSON ("),
    ("resume-trainer-state-missing", resume("arm", "trainer_state.json"), remove, INCOMPLETE.format("trainer_state.json")),
    ("resume-trainer-state-half", resume("arm", "trainer_state.json"), half, "{file}: not valid JSON ("),
    ("resume-optimizer-garbage", resume("arm", "optimizer.pt"), garbage, "{file}: " + TORCH_ARCHIVE),
    ("resume-scheduler-missing", resume("arm", "scheduler.pt"), remove, INCOMPLETE.format("scheduler.pt")),
    ("resume-rng-state-half", resume("arm", "rng_state.pth"), half, "{file}: " + TORCH_ARCHIVE),
    # the state of a stateful multi-objective method (DWA's loss history) in a checkpoint
    ("resume-method-state-half", resume("parm", "mograd_state.pt"), half, "{file}: " + TORCH_ARCHIVE),
    ("resume-method-state-garbage", resume("parm", "mograd_state.pt"), garbage, "{file}: " + TORCH_ARCHIVE),
    ("resume-method-state-empty", resume("parm", "mograd_state.pt"), empty, "{file}: empty file (expected a torch.save archive)"),
    ("resume-method-state-of-another-method", resume("parm", "mograd_state.pt"), another_method_state, "{file}: holds another method's state (entries ['weights']; dwa keeps"),
    # merge inputs
    ("merge-input-weights-half", merge_models("same", lambda m: m / "model.safetensors"), half, "cannot merge these checkpoints: brief: {file}: " + NOT_SAFETENSORS),
    ("merge-input-weights-garbage", merge_models("same", lambda m: m / "model.safetensors"), garbage, "{file}: " + NOT_SAFETENSORS),
    ("merge-input-config-latin1", merge_models("same", lambda m: m / "config.json"), latin1, "{file}: not UTF-8 text (byte 0xe9 at line "),
    ("merge-input-shard-half", merge_models("sharded", last_shard), half, "{file}: " + NOT_SAFETENSORS),
    ("merge-input-shard-missing", merge_models("sharded", last_shard), remove, f"{INDEX}: names model-00005-of-00005.safetensors, which is missing"),
    ("merge-input-index-half", merge_models("sharded", lambda m: m / INDEX), half, "{file}: not valid JSON ("),
    ("merge-input-lora-weights-half", merge_lora(WEIGHTS), half, "{file}: " + NOT_SAFETENSORS),
    ("merge-input-lora-config-empty", merge_lora(CONFIG), empty, "{file}: empty file (expected JSON)"),
]
# fmt: on


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("command", "bad", "said"), [row[1:] for row in BAD_FILES], ids=[row[0] for row in BAD_FILES]
)
def test_a_bad_file_is_one_error_line_and_nothing_is_written(tmp_path, made, command, bad, said):
    arguments, path = command(tmp_path, made)
    bad(path)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, arguments)
    assert_one_error_line(result, said.format(file=path))
    assert _tree(tmp_path) == before  # no output, no staging folder, no new checkpoint


# fmt: off
UNBROKEN = [
    *[(f"data{suffix}", train_on_data(suffix)) for suffix in DATA_ERRORS],
    ("model", train_on_model("config.json")),
    ("resume-arm", resume("arm", WEIGHTS)),
    ("resume-parm", resume("parm", "mograd_state.pt")),
    ("parm", generate_with("parm", WEIGHTS)),
    ("arm", generate_with("arm", WEIGHTS)),
    ("prompts.txt", generate_from_prompts("prompts.txt")),
    ("prompts.jsonl", generate_from_prompts("prompts.jsonl")),
    ("merge", merge_models("same", lambda m: m / "model.safetensors")),
    ("merge-sharded", merge_models("sharded", last_shard)),
    ("merge-lora", merge_lora(WEIGHTS)),
]
# fmt: on


@pytest.mark.parametrize("command", [row[1] for row in UNBROKEN], ids=[row[0] for row in UNBROKEN])
def test_the_same_commands_run_when_the_files_are_whole(tmp_path, made, command):
    """The other half of the table: its errors come from the broken files, not the commands."""
    arguments, _ = command(tmp_path, made)
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "final").is_dir() or any(
        (tmp_path / name).exists() for name in ("answers.jsonl", "out")
    )


def test_bad_files_in_a_real_process_end_in_one_error_line(tmp_path, made):
    """Outside CliRunner, through both entry points: what a user sees is the one line, last."""
    (tmp_path / "train").mkdir()
    (tmp_path / "merge").mkdir()
    arguments, path = train_on_data(".jsonl")(tmp_path / "train", made)
    cut_last_record(path)
    train = _run("-m", "align.train", *arguments[1:])
    arguments, weights = merge_models("same", lambda m: m / "model.safetensors")(
        tmp_path / "merge", made
    )
    half(weights)
    merge = _run("-m", "align.cli", *arguments)
    for result, file in ((train, path), (merge, weights)):
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{file}: " in errors[0], output
        assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "train" / "run").exists() and not (tmp_path / "merge" / "out").exists()
