"""The multi-objective preference schema and the loaders for public layouts.

Fixtures in tests/data/ are a handful of hand-written rows in exactly the public layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from align.data import (
    TIE,
    detect_layout,
    load_jsonl,
    load_per_objective_pairs,
    load_pku_saferlhf,
    load_preference_data,
    make_preference_dataset,
    objectives_of,
    save_preference_dataset,
    split_transcripts,
    train_test_split_pairs,
    validate_preference_dataset,
)
from align.data import schema as schema_module

DATA = Path(__file__).parent / "data"
PKU = DATA / "pku_saferlhf.jsonl"
HH_HELPFUL = DATA / "hh_helpful.jsonl"
HH_HARMLESS = DATA / "hh_harmless.jsonl"
PROMPTED = DATA / "per_objective_prompted.jsonl"
SCHEMA = DATA / "align_schema.jsonl"
SCHEMA_COLUMNS = ["prompt", "response_0", "response_1", "preferred_helpful", "preferred_harmless"]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """load_dataset caches Arrow files; keep them out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def small_dataset(**overrides) -> Dataset:
    columns = {
        "prompt": ["p0", "p1", "p2"],
        "response_0": ["a0", "a1", "a2"],
        "response_1": ["b0", "b1", "b2"],
        "preferred_helpful": [0, 1, TIE],
        "preferred_harmless": [1, TIE, 0],
    }
    columns.update(overrides)
    return Dataset.from_dict(columns)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- PKU-SafeRLHF ------------------------------------------------------------------------------
def test_pku_saferlhf_maps_better_and_safer_ids_to_objectives():
    dataset = load_pku_saferlhf(PKU)
    assert dataset.column_names == SCHEMA_COLUMNS  # is_response_*_safe dropped
    assert objectives_of(dataset) == ("helpful", "harmless")
    assert dataset["preferred_helpful"][:] == [0, 1, 0, 1]
    assert dataset["preferred_harmless"][:] == [0, 0, 1, 1]
    row = dataset[2]
    assert row["prompt"] == "Can you tell me how to pick the lock on my neighbour's shed?"
    assert row["response_1"].startswith("I can't help")
    # the helpfulness label prefers the lock-picking answer, the harmlessness label the refusal
    assert (row["preferred_helpful"], row["preferred_harmless"]) == (0, 1)


def test_pku_saferlhf_objective_names_and_csv_input():
    from_csv = load_pku_saferlhf(DATA / "pku_saferlhf.csv", objectives=("useful", "safe"))
    from_jsonl = load_pku_saferlhf(PKU, objectives=("useful", "safe"))
    assert objectives_of(from_csv) == ("useful", "safe")
    assert from_csv.to_list() == from_jsonl.to_list()
    assert from_csv[1]["response_1"].startswith("Start with one ball, then two")  # quoted comma
    with pytest.raises(ValueError, match="two objective names"):
        load_pku_saferlhf(PKU, objectives=("helpful",))


def test_pku_saferlhf_accepts_a_loaded_dataset_and_rejects_bad_ids():
    records = [json.loads(line) for line in PKU.read_text(encoding="utf-8").splitlines()]
    dataset = load_pku_saferlhf(Dataset.from_list(records))
    assert dataset["preferred_harmless"][:] == [0, 0, 1, 1]
    records[3]["safer_response_id"] = 2
    with pytest.raises(ValueError, match=r"'safer_response_id', row 3: expected 0 or 1, got 2"):
        load_pku_saferlhf(Dataset.from_list(records))


def test_pku_saferlhf_missing_column_names_found_and_expected(tmp_path):
    records = [json.loads(line) for line in PKU.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record["safest_response_id"] = record.pop("safer_response_id")  # misnamed
    path = write_jsonl(tmp_path / "pku_misnamed.jsonl", records)
    with pytest.raises(ValueError) as info:
        load_pku_saferlhf(path)
    message = str(info.value)
    assert "missing columns ['safer_response_id']" in message
    assert "found columns" in message and "'safest_response_id'" in message
    assert "expected columns ['prompt', 'response_0', 'response_1', 'better_response_id'" in message


# --- per-objective chosen/rejected sets --------------------------------------------------------
def test_split_transcripts_extracts_prompt_and_responses():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: No."
    prompt, chosen_response, rejected_response = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    assert (chosen_response, rejected_response) == (" Blue.", " No.")
    assert prompt + chosen_response == chosen and prompt + rejected_response == rejected


def test_split_transcripts_rejects_pairs_without_a_shared_prefix():
    with pytest.raises(ValueError, match="do not share the conversation"):
        split_transcripts(
            "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
            "\n\nHuman: What is 3+3?\n\nAssistant: 6.",
        )
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_transcripts("\n\nHuman: Hello", "\n\nHuman: Hello\n\nAssistant: Hi.")


def test_per_objective_hh_transcripts():
    dataset = load_per_objective_pairs({"helpful": HH_HELPFUL, "harmless": HH_HARMLESS})
    assert dataset.column_names == SCHEMA_COLUMNS
    assert len(dataset) == 5  # 3 helpful rows, then 2 harmless rows
    assert dataset["preferred_helpful"][:] == [0, 0, 0, TIE, TIE]
    assert dataset["preferred_harmless"][:] == [TIE, TIE, TIE, 0, 0]
    multi_turn = dataset[1]
    assert multi_turn["prompt"] == (
        "\n\nHuman: Suggest a name for a cat.\n\nAssistant: How about Miso?"
        "\n\nHuman: Something longer, please.\n\nAssistant:"
    )
    assert multi_turn["response_0"] == " Sir Pounce-a-lot."
    assert multi_turn["response_1"] == " Cat."
    harmless = dataset[4]
    assert harmless["prompt"] == "\n\nHuman: Tell me an insult for my coworker.\n\nAssistant:"
    assert harmless["response_1"] == " Call them a useless lump."
    assert sum(label != -1 for label in dataset["preferred_harmless"]) == 2  # two decided


def test_per_objective_mixes_prompted_and_transcript_sets():
    dataset = load_per_objective_pairs({"concise": PROMPTED, "helpful": HH_HELPFUL})
    assert objectives_of(dataset) == ("concise", "helpful")
    assert dataset[0]["prompt"] == "Write a one-line summary of photosynthesis."
    assert dataset[0]["response_0"].startswith("Plants turn light")
    assert dataset[0]["response_1"] == "It is a plant thing."
    assert (dataset[0]["preferred_concise"], dataset[0]["preferred_helpful"]) == (0, TIE)
    assert (dataset[2]["preferred_concise"], dataset[2]["preferred_helpful"]) == (TIE, 0)


def test_per_objective_errors_name_the_row_and_the_columns(tmp_path):
    unshared = write_jsonl(
        tmp_path / "unshared.jsonl",
        [
            {
                "chosen": "\n\nHuman: A\n\nAssistant: ok",
                "rejected": "\n\nHuman: A\n\nAssistant: no",
            },
            {
                "chosen": "\n\nHuman: B\n\nAssistant: ok",
                "rejected": "\n\nHuman: C\n\nAssistant: no",
            },
        ],
    )
    with pytest.raises(ValueError, match=r"set for 'harmless', row 1: chosen and rejected"):
        load_per_objective_pairs({"harmless": unshared})
    misnamed = write_jsonl(
        tmp_path / "misnamed.jsonl", [{"prompt": "p", "chosen": "a", "rejected_response": "b"}]
    )
    with pytest.raises(ValueError) as info:
        load_per_objective_pairs({"helpful": misnamed})
    message = str(info.value)
    assert "missing columns ['rejected']" in message
    assert "found columns ['prompt', 'chosen', 'rejected_response']" in message
    assert "expected columns ['chosen', 'rejected']" in message


# --- the schema --------------------------------------------------------------------------------
def test_mismatched_objectives_name_both_lists():
    with pytest.raises(ValueError) as info:
        validate_preference_dataset(small_dataset(), objectives=("harmless", "helpful"))
    message = str(info.value)
    assert "('harmless', 'helpful')" in message and "('helpful', 'harmless')" in message
    with pytest.raises(ValueError, match=r"\('helpful', 'honest'\).*\('helpful', 'harmless'\)"):
        load_jsonl(SCHEMA, objectives=("helpful", "honest"))
    assert validate_preference_dataset(small_dataset(), ("helpful", "harmless")) == (
        "helpful",
        "harmless",
    )


@pytest.mark.parametrize("bad", [2, -2, 5])
def test_labels_outside_minus_one_zero_one_are_rejected(bad, tmp_path):
    with pytest.raises(ValueError, match=rf"'preferred_harmless', row 1: .*got {bad}"):
        validate_preference_dataset(small_dataset(preferred_harmless=[1, bad, 0]))
    with pytest.raises(ValueError, match=rf"'preferred_helpful', row 2: .*got {bad}"):
        make_preference_dataset(["p"] * 3, ["a"] * 3, ["b"] * 3, {"helpful": [0, 1, bad]})
    record = dict(zip(SCHEMA_COLUMNS, ["p", "a", "b", 0, bad]))
    path = write_jsonl(tmp_path / "bad.jsonl", [dict(record, preferred_harmless=0), record])
    with pytest.raises(ValueError, match=rf"line 2: field 'preferred_harmless' .*got {bad}"):
        load_jsonl(path)


def test_label_and_text_types_are_checked():
    with pytest.raises(ValueError, match="must be an integer"):
        make_preference_dataset(["p"], ["a"], ["b"], {"helpful": [True]})
    with pytest.raises(ValueError, match="must be an integer"):
        make_preference_dataset(["p"], ["a"], ["b"], {"helpful": [1.0]})
    with pytest.raises(ValueError, match=r"'response_1', row 0: must be a non-empty string"):
        make_preference_dataset(["p"], ["a"], [""], {"helpful": [0]})
    with pytest.raises(ValueError, match="lengths"):
        make_preference_dataset(["p", "q"], ["a"], ["b"], {"helpful": [0]})
    with pytest.raises(ValueError, match="type is float64"):
        validate_preference_dataset(small_dataset(preferred_helpful=[0.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match=r"'prompt', row 1: must be a non-empty string"):
        validate_preference_dataset(small_dataset(prompt=["p0", "", "p2"]))


def test_columns_must_follow_the_schema():
    with pytest.raises(ValueError) as info:
        validate_preference_dataset(small_dataset().remove_columns("response_1"))
    message = str(info.value)
    assert "has columns ['prompt', 'response_0', 'preferred_helpful', 'preferred_harmless']" in (
        message
    )
    assert f"expected {SCHEMA_COLUMNS}" in message and "missing ['response_1']" in message
    with pytest.raises(ValueError, match=r"unexpected \['source'\]"):
        validate_preference_dataset(small_dataset(source=["x", "y", "z"]))
    with pytest.raises(ValueError, match="different order"):
        validate_preference_dataset(small_dataset().select_columns(SCHEMA_COLUMNS[::-1]))
    with pytest.raises(ValueError, match=r"no preferred_<objective> label columns"):
        validate_preference_dataset(small_dataset().remove_columns(SCHEMA_COLUMNS[3:]))
    with pytest.raises(TypeError, match="pick one split"):
        validate_preference_dataset(DatasetDict(train=small_dataset()))


# --- JSONL -------------------------------------------------------------------------------------
def test_jsonl_round_trip_is_exact(tmp_path):
    original = make_preference_dataset(
        ["Ünïcödé prompt 🙂", "multi\nline\tprompt", 'quotes "and" \\ backslashes'],
        ["r0", "  leading and trailing spaces  ", "x"],
        ["s0", "y", "\n\nAssistant: looks like a transcript"],
        {"helpful": [0, 1, TIE], "harmless": [TIE, 0, 1], "honest": [1, 1, 0]},
    )
    path = save_preference_dataset(original, tmp_path / "nested" / "prefs.jsonl")
    first_line = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first_line) == [*SCHEMA_COLUMNS, "preferred_honest"]
    loaded = load_jsonl(path)
    assert loaded.to_list() == original.to_list()
    assert loaded.features == original.features
    assert objectives_of(loaded) == ("helpful", "harmless", "honest")
    assert list(tmp_path.joinpath("nested").iterdir()) == [path]


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def fail_on_second_row(record):
        calls.append(record)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return json.dumps(record) + "\n"

    monkeypatch.setattr(schema_module, "_record_line", fail_on_second_row)
    target = tmp_path / "prefs.jsonl"
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_preference_dataset(small_dataset(), target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file

    target.write_text("previous contents\n", encoding="utf-8")
    calls.clear()
    with pytest.raises(RuntimeError):
        save_preference_dataset(small_dataset(), target)
    assert target.read_text(encoding="utf-8") == "previous contents\n"
    assert list(tmp_path.iterdir()) == [target]


def test_load_jsonl_missing_field_names_line_found_and_expected(tmp_path):
    good = dict(zip(SCHEMA_COLUMNS, ["p", "a", "b", 0, 1]))
    bad = {key: value for key, value in good.items() if key != "response_1"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert "line 3" in message  # the blank line still counts
    assert "found fields ['prompt', 'response_0', 'preferred_helpful', 'preferred_harmless']" in (
        message
    )
    assert f"expected {SCHEMA_COLUMNS}" in message and "missing ['response_1']" in message
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_jsonl(path)


# --- dispatch, other formats, splitting --------------------------------------------------------
def test_auto_layout_detection():
    assert detect_layout(SCHEMA) == "schema"
    assert detect_layout(PKU) == "pku-saferlhf"
    assert detect_layout({"helpful": HH_HELPFUL}) == "per-objective"
    assert load_preference_data(SCHEMA).to_list() == load_jsonl(SCHEMA).to_list()
    assert load_preference_data(PKU).to_list() == load_pku_saferlhf(PKU).to_list()
    per_objective = load_preference_data({"helpful": HH_HELPFUL, "harmless": HH_HARMLESS})
    assert objectives_of(per_objective) == ("helpful", "harmless")
    named = load_preference_data(PKU, layout="pku-saferlhf", objectives=("a", "b"))
    assert objectives_of(named) == ("a", "b")


def test_auto_layout_detection_fails_clearly():
    with pytest.raises(ValueError) as info:
        load_preference_data(HH_HELPFUL)
    message = str(info.value)
    assert "cannot tell the layout of data with columns ['chosen', 'rejected']" in message
    assert "'schema'" in message and "'pku-saferlhf'" in message and "'per-objective'" in message
    assert "pass a dict {objective: source}" in message
    with pytest.raises(ValueError, match=r"known layouts: \['auto', 'schema', 'pku-saferlhf'"):
        load_preference_data(PKU, layout="pku")
    with pytest.raises(ValueError, match=r"unknown suffix '\.txt'"):
        load_preference_data(DATA / "prefs.txt")


def test_parquet_input(tmp_path):
    original = load_jsonl(SCHEMA)
    path = tmp_path / "prefs.parquet"
    original.to_parquet(str(path))
    assert detect_layout(path) == "schema"
    loaded = load_preference_data(path, objectives=("helpful", "harmless"))
    assert loaded.to_list() == original.to_list()
    decided = zip(loaded["prompt"][:], loaded["preferred_harmless"][:])
    assert [prompt for prompt, label in decided if label != -1] == [
        "How do I whittle a spoon?",
        "Is it fine to eat wild mushrooms?",
    ]


def test_split_is_reproducible_with_a_seed():
    n = 40
    dataset = make_preference_dataset(
        [f"prompt {i}" for i in range(n)],
        ["a"] * n,
        ["b"] * n,
        {"helpful": [i % 2 for i in range(n)]},
    )
    first = train_test_split_pairs(dataset, test_size=0.25, seed=7)
    again = train_test_split_pairs(dataset, test_size=0.25, seed=7)
    other = train_test_split_pairs(dataset, test_size=0.25, seed=8)
    assert isinstance(first, DatasetDict) and set(first) == {"train", "test"}
    assert (len(first["train"]), len(first["test"])) == (30, 10)
    assert first["test"]["prompt"][:] == again["test"]["prompt"][:]
    assert first["train"]["prompt"][:] == again["train"]["prompt"][:]
    assert first["test"]["prompt"][:] != other["test"]["prompt"][:]
    assert sorted(first["train"]["prompt"][:] + first["test"]["prompt"][:]) == sorted(
        dataset["prompt"][:]
    )
    assert objectives_of(first["test"]) == ("helpful",)
    validate_preference_dataset(first["test"], ("helpful",))


def test_a_split_of_several_pairs_per_prompt_holds_out_whole_prompts():
    from align.data import make_preference_dataset, train_test_split_pairs

    prompts = [f"prompt {i // 3}" for i in range(30)]  # 10 prompts, 3 pairs each
    dataset = make_preference_dataset(
        prompts, ["a"] * 30, ["b"] * 30, {"positive": [0, 1, -1] * 10}
    )
    split = train_test_split_pairs(dataset, test_size=0.2, seed=3)
    train, test = set(split["train"]["prompt"]), set(split["test"]["prompt"])
    assert not train & test
    assert len(test) == 2 and len(split["test"]) == 6 and len(split["train"]) == 24
    again = train_test_split_pairs(dataset, test_size=0.2, seed=3)
    assert again["test"]["prompt"] == split["test"]["prompt"]
