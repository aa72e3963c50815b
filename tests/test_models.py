import os

import pytest
import torch

from align.io import atomic_directory
from align.models import (
    EMBEDDED_MODEL,
    ModelLoadError,
    cache_root,
    embedded_model_path,
    load_model,
    load_tokenizer,
)
from align.testing import tiny_causal_lm


def test_tiny_tokenizer_is_a_real_chat_tokenizer(tiny_lm):
    _, tokenizer = tiny_lm
    text = "Hello, wörld! 123 — émojis 🙂 too."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: any text round-trips
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_tiny_model_is_seeded_and_runs(tiny_lm):
    model, tokenizer = tiny_lm
    again, _ = tiny_causal_lm(seed=0)
    other, _ = tiny_causal_lm(seed=1)
    ids = tokenizer("a short test", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        assert torch.equal(logits, again(**ids).logits)
        assert not torch.allclose(logits, other(**ids).logits)
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))


def test_local_checkpoint_round_trip(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path)
    ids = tokenizer("round trip", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)
    assert loaded_tokenizer("round trip")["input_ids"] == tokenizer("round trip")["input_ids"]


def test_missing_and_empty_folders_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no checkpoint folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    model, _ = tiny_causal_lm()
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_model(tmp_path)


def test_hub_id_without_network_names_the_embedded_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=f"Hugging Face Hub.*{EMBEDDED_MODEL}"):
        load_tokenizer("some-org/some-model-that-is-not-cached")


def test_cache_root_follows_align_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("ALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "align"


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-write")
    assert not target.exists() and os.listdir(tmp_path) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    with atomic_directory(target) as tmp:  # a cache: the existing result wins
        (tmp / "other.txt").write_text("second")
    assert sorted(os.listdir(target)) == ["done.txt"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "other.txt").write_text("second")
    assert sorted(os.listdir(target)) == ["other.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_results_get_the_usual_permissions_not_private_temporary_ones(tmp_path):
    from align.io import atomic_file

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_a_content_digest_follows_what_a_model_computes_not_where_it_lies(tmp_path):
    """Caches key on it: a moved run is reused, a retrained adapter is not."""
    import shutil

    from align.io import content_digest

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"output_dir=/here")
    first = content_digest(folder)
    shutil.copytree(folder, tmp_path / "elsewhere" / "final")
    assert content_digest(tmp_path / "elsewhere" / "final") == first
    # What does not change the answers: the Trainer's arguments, checkpoints, READMEs.
    (folder / "training_args.bin").write_bytes(b"output_dir=/there")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"older")
    (folder / "README.md").write_text("card")
    assert content_digest(folder) == first
    # What does: the weights, the config, a renamed weights file.
    (folder / "adapter_model.safetensors").write_bytes(b"retrained")
    assert content_digest(folder) != first
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    assert content_digest(folder) == first
    (folder / "adapter_config.json").write_text('{"r": 8}')
    assert content_digest(folder) != first
    # A single file (a dataset) by its bytes, whatever its name.
    (tmp_path / "a.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "hi"}\n')
    assert content_digest(tmp_path / "a.jsonl") == content_digest(tmp_path / "b.jsonl")
    assert content_digest(tmp_path / "a.jsonl") != content_digest(folder)


def test_embedded_smollm2_loads_from_its_cache_and_generates(smollm2, monkeypatch):
    from align.models import loading

    model, tokenizer = smollm2
    path = embedded_model_path()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    # Once cached, a load reads the converted checkpoint: no GGUF is de-quantised again.
    def converted_again(*_args, **_kwargs):
        raise AssertionError("the cached embedded model was converted from GGUF again")

    monkeypatch.setattr(loading, "convert_gguf", converted_again)
    again, _ = load_model()
    assert getattr(again, "hf_quantizer", None) is None
    assert getattr(again.config, "quantization_config", None) is None
    assert next(again.parameters()).dtype == torch.float32

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(
        **chat, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    answer = tokenizer.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # a real instruction-tuned model, not random weights


@pytest.mark.slow
def test_fresh_conversion_matches_gguf_logits(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.models import embedded_gguf_path

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    path = embedded_model_path()
    assert path.is_relative_to(tmp_path)
    gguf = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    converted, tokenizer = load_model(path)
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reference(**ids).logits, converted(**ids).logits)
