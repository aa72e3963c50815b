import pytest
import torch
from peft import get_peft_model

from align.adapters import PBLoraConfig, get_preference, set_preference
from align.chat import format_prompt
from align.decoding import (
    Guidance,
    check_same_tokenizer,
    genarm_guidance,
    guided_custom_generate,
    guided_decode,
    guided_generate,
    mod_guidance,
    parm_guidance,
    sampling_processors,
)
from align.models import load_model
from align.testing import tiny_causal_lm, tiny_tokenizer

OBJECTIVES = ("helpful", "harmless")
PROMPTS = ["Hi", "Tell me about the weather on a long rainy day", "Why is the sky blue?"]


def tiny(seed):
    """A random tiny LM with strong, distinct preferences: a random init (std 0.02, tied
    embeddings) gives near-uniform next-token distributions that could not steer anything."""
    model = tiny_causal_lm(seed=seed, tie_word_embeddings=False)[0]
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


def parm_arm(base_seed=1):
    torch.manual_seed(7)
    config = PBLoraConfig(objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0)
    arm = get_peft_model(tiny(base_seed), config).eval()
    # init_weights=False draws B with std 0.02; scale up so α visibly changes the ARM.
    with torch.no_grad():
        for name, p in arm.named_parameters():
            if "pblora_B" in name:
                p.mul_(50)
    return arm


@pytest.fixture(scope="module")
def setup():
    base, tokenizer = tiny_causal_lm(seed=0)  # an unsharpened base: the guides can win
    texts = [format_prompt(tokenizer, p) for p in PROMPTS]
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    return base, tokenizer, batch


def guidance_for(mode):
    if mode == "parm":
        return parm_guidance(parm_arm(), beta=0.5)
    if mode == "genarm":
        return genarm_guidance({"helpful": tiny(2), "harmless": tiny(3)}, beta=0.5)
    return mod_guidance({"helpful": tiny(4), "harmless": tiny(5)})


def reference_greedy(base, guidance, input_ids, attention_mask, alpha, steps):
    """No cache: recompute every model on the whole sequence and the whole formula each step."""
    if guidance.mode == "parm":
        set_preference(guidance.models[0], alpha)
        terms = [
            (base, torch.ones(len(alpha))),
            (guidance.models[0], torch.full((len(alpha),), 1 / guidance.beta)),
        ]
    elif guidance.mode == "genarm":
        terms = [(base, torch.ones(len(alpha)))] + [
            (m, alpha[:, j] / guidance.beta) for j, m in enumerate(guidance.models)
        ]
    else:
        terms = [(m, alpha[:, j]) for j, m in enumerate(guidance.models)]
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        total = 0
        for model, weight in terms:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[
                    :, -1
                ]
            total = total + weight[:, None] * torch.log_softmax(logits.float(), dim=-1)
        token = total.argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids


def decode(base, tokenizer, guidance, batch, preference, steps=8, **kwargs):
    return guided_decode(
        base,
        guidance,
        batch["input_ids"],
        batch["attention_mask"],
        preference,
        max_new_tokens=steps,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["parm", "genarm", "mod"])
def test_cached_decoding_equals_the_no_cache_reference(setup, mode):
    base, tokenizer, batch = setup
    guidance = guidance_for(mode)
    alpha = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    cached = decode(base, tokenizer, guidance, batch, alpha)
    reference = reference_greedy(
        base, guidance, batch["input_ids"], batch["attention_mask"], alpha, 8
    )
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("mode", ["parm", "genarm", "mod"])
def test_per_row_alpha_equals_separate_runs_and_alpha_matters(setup, mode):
    base, tokenizer, batch = setup
    guidance = guidance_for(mode)
    rows = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    together = decode(base, tokenizer, guidance, batch, rows)
    for i in range(3):
        alone = decode(base, tokenizer, guidance, batch, rows[i])
        assert torch.equal(together[i], alone[i])
    outputs = {
        tuple(decode(base, tokenizer, guidance, batch, a)[1].tolist())
        for a in ([1.0, 0.0], [0.0, 1.0])
    }
    assert len(outputs) == 2  # the two vertices steer the same prompt differently


def test_genarm_at_a_vertex_equals_base_plus_that_single_arm(setup):
    base, tokenizer, batch = setup
    arms = {"helpful": tiny(2), "harmless": tiny(3)}
    both = decode(
        base, tokenizer, genarm_guidance(arms, beta=0.5), batch, {"helpful": 0.0, "harmless": 1.0}
    )
    single = decode(
        base, tokenizer, genarm_guidance({"harmless": arms["harmless"]}, beta=0.5), batch, [1.0]
    )
    assert torch.equal(both, single)


@pytest.mark.parametrize("mode", ["parm", "genarm"])
def test_infinite_beta_gives_the_base_models_own_greedy_output(setup, mode):
    base, tokenizer, batch = setup
    guidance = guidance_for(mode)
    guidance.beta = float("inf")
    ours = decode(base, tokenizer, guidance, batch, [0.5, 0.5])
    theirs = base.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    assert torch.equal(ours, theirs)


def test_transformers_generate_with_custom_generate_matches_the_api(setup):
    base, tokenizer, batch = setup
    guidance = guidance_for("parm")
    alpha = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    expected = decode(base, tokenizer, guidance, batch, alpha)
    via_generate = base.generate(
        **batch,
        custom_generate=guided_custom_generate,
        guidance=guidance,
        preference=alpha,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    assert torch.equal(via_generate, expected)


def test_sampling_is_seeded_and_top_k_one_is_greedy(setup):
    base, tokenizer, batch = setup
    guidance = guidance_for("genarm")

    def sample(seed, **warpers):
        processors = sampling_processors(True, **warpers)
        generator = torch.Generator().manual_seed(seed)
        return decode(
            base,
            tokenizer,
            guidance,
            batch,
            [0.5, 0.5],
            steps=10,
            do_sample=True,
            logits_processor=processors,
            generator=generator,
        )

    assert torch.equal(sample(3, temperature=1.5), sample(3, temperature=1.5))
    assert not torch.equal(sample(3, temperature=1.5), sample(4, temperature=1.5))
    greedy = decode(base, tokenizer, guidance, batch, [0.5, 0.5], steps=10)
    assert torch.equal(sample(9, top_k=1), greedy)
    assert torch.equal(sample(9, top_p=1e-6), greedy)
    texts = guided_generate(
        base, tokenizer, PROMPTS, guidance, [0.5, 0.5], max_new_tokens=10, do_sample=True, seed=3
    )
    assert texts == guided_generate(
        base, tokenizer, PROMPTS, guidance, [0.5, 0.5], max_new_tokens=10, do_sample=True, seed=3
    )


def test_rows_stop_at_eos_and_streamer_sees_every_token(setup):
    base, tokenizer, batch = setup
    guidance = guidance_for("genarm")
    free = decode(base, tokenizer, guidance, batch, [0.5, 0.5], steps=8)
    prompt_length = batch["input_ids"].shape[1]
    new = free[:, prompt_length:]
    # Pretend a token row 0 produces at step k >= 1, and no row produced before, is the EOS.
    step = next(k for k in range(1, 5) if not torch.isin(new[0, k], new[:, :k]).item())
    eos = int(new[0, step])

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    recorder = Recorder()
    stopped = guided_decode(
        base,
        guidance,
        batch["input_ids"],
        batch["attention_mask"],
        [0.5, 0.5],
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        streamer=recorder,
    )
    row = stopped[0, prompt_length:]
    assert torch.equal(row[: step + 1], new[0, : step + 1])
    assert torch.all(row[step + 1 :] == tokenizer.pad_token_id)
    assert recorder.ended and torch.equal(recorder.chunks[0], batch["input_ids"])
    assert torch.equal(torch.stack(recorder.chunks[1:], dim=1), stopped[:, prompt_length:])


def test_tokenizer_mismatch_is_a_clear_error(setup):
    base, tokenizer, _ = setup
    other = tiny_tokenizer(vocab_size=600)
    with pytest.raises(ValueError, match="do not share a tokenizer: vocabulary sizes differ"):
        check_same_tokenizer(tokenizer, other)
    guidance = genarm_guidance(
        {"helpful": tiny(2), "harmless": tiny(3)}, tokenizers=[tokenizer, other]
    )
    with pytest.raises(ValueError, match="guiding model 1"):
        guided_generate(base, tokenizer, ["Hi"], guidance, [0.5, 0.5], max_new_tokens=2)
    check_same_tokenizer(tokenizer, tiny_tokenizer())  # the same tokenizer passes


def test_bad_inputs_are_clear_errors(setup):
    base, tokenizer, _ = setup
    with pytest.raises(ValueError, match="needs 2 model"):
        Guidance("genarm", [tiny(2)], OBJECTIVES)
    with pytest.raises(ValueError, match="beta must be > 0"):
        genarm_guidance({"helpful": tiny(2), "harmless": tiny(3)}, beta=0)
    with pytest.raises(ValueError, match="sums to"):
        guided_generate(base, tokenizer, ["Hi"], guidance_for("mod"), [0.5, 0.6], max_new_tokens=2)


def test_parm_guidance_on_the_embedded_model_matches_the_reference():
    base, tokenizer = load_model()
    arm_base, _ = load_model()
    torch.manual_seed(0)
    arm = get_peft_model(
        arm_base, PBLoraConfig(objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0)
    ).eval()
    texts = [format_prompt(tokenizer, p) for p in PROMPTS[:2]]
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    guidance = parm_guidance(arm, beta=1.0, tokenizer=tokenizer)
    alpha = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cached = decode(base, tokenizer, guidance, batch, alpha, steps=5)
    reference = reference_greedy(
        base, guidance, batch["input_ids"], batch["attention_mask"], alpha, 5
    )
    assert torch.equal(cached, reference)
    answers = guided_generate(base, tokenizer, PROMPTS[:2], guidance, alpha, max_new_tokens=12)
    assert all(answers)


def test_generate_cli_with_a_parm_adapter_and_with_genarm_checkpoints(tmp_path):
    import json

    from typer.testing import CliRunner

    from align.cli import app

    base, tokenizer = tiny_causal_lm(seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    parm_arm().save_pretrained(tmp_path / "parm")
    for name, seed in (("helpful", 2), ("harmless", 3)):
        tiny(seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    runner = CliRunner()
    common = [
        "--base",
        str(tmp_path / "base"),
        "--max-new-tokens",
        "6",
        "--prompts-file",
        str(prompts),
    ]

    out = tmp_path / "parm.jsonl"
    result = runner.invoke(
        app,
        [
            "generate",
            "--arm",
            str(tmp_path / "parm"),
            "--preference",
            "helpful=0.7,harmless=0.3",
            "--output",
            str(out),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert rows[0]["preference"] == {"helpful": 0.7, "harmless": 0.3} and rows[0]["mode"] == "parm"

    arms = [
        "--arm",
        f"helpful={tmp_path / 'helpful'}",
        "--arm",
        f"harmless={tmp_path / 'harmless'}",
    ]
    out = tmp_path / "genarm.jsonl"
    result = runner.invoke(
        app,
        [
            "generate",
            "--mode",
            "genarm",
            *arms,
            "--preference",
            "0.5,0.5",
            "--output",
            str(out),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == len(PROMPTS)

    bad = runner.invoke(
        app, ["generate", "--mode", "genarm", *arms, "--preference", "helpful=2", *common]
    )
    assert bad.exit_code == 2 and "preference" in bad.output


def test_parm_sharing_the_base_runs_one_batched_forward_with_the_same_tokens(setup):
    """PARM = base + adapter on the same module: base rows run with the adapter gated off."""
    _, tokenizer, batch = setup
    separate_base = tiny_causal_lm(seed=0)[0]
    torch.manual_seed(7)
    config = PBLoraConfig(objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0)
    arm = get_peft_model(tiny_causal_lm(seed=0)[0], config).eval()  # same weights as separate_base
    with torch.no_grad():
        for name, p in arm.named_parameters():
            if "pblora_B" in name:
                p.mul_(50)
    shared_base = arm.get_base_model()
    alpha = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    guidance = parm_guidance(arm, beta=0.5)
    shared = decode(shared_base, tokenizer, guidance, batch, alpha)
    separate = decode(separate_base, tokenizer, guidance, batch, alpha)
    assert torch.equal(shared, separate)
    assert not torch.equal(
        shared,
        decode(separate_base, tokenizer, parm_guidance(arm, beta=float("inf")), batch, alpha),
    )
    guidance.beta = float("inf")  # only the gated-off base rows remain: the base's own output
    expected = separate_base.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    assert torch.equal(decode(shared_base, tokenizer, guidance, batch, alpha), expected)
    # the gate and α were put back: the adapter applies to every row again, α is unset
    assert all(layer._row_gate is None for layer in arm.base_model.preference_layers())
    assert get_preference(arm) is None


def test_custom_generate_samples_per_prompt_alpha_rejects_beams_and_needs_no_pad(setup):
    base, tokenizer, batch = setup
    guidance = guidance_for("genarm")
    rows = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    common = dict(custom_generate=guided_custom_generate, guidance=guidance, max_new_tokens=5)
    greedy = base.generate(
        **batch, preference=rows, do_sample=False, pad_token_id=tokenizer.pad_token_id, **common
    )
    torch.manual_seed(0)
    sampled = base.generate(
        **batch,
        preference=rows,
        do_sample=True,
        num_return_sequences=2,
        pad_token_id=tokenizer.pad_token_id,
        **common,
    )
    assert sampled.shape[0] == 6
    with pytest.raises(ValueError, match="beam search"):
        base.generate(**batch, preference=rows, num_beams=2, **common)
    saved = base.generation_config.pad_token_id
    base.generation_config.pad_token_id = None  # a model without a pad token
    try:
        no_pad = base.generate(**batch, preference=rows, do_sample=False, **common)
    finally:
        base.generation_config.pad_token_id = saved
    assert torch.equal(no_pad, greedy)

    class Recorder:
        chunks, ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    recorder = Recorder()
    base.generate(
        **batch,
        preference=rows,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        guided_streamer=recorder,
        **common,
    )
    assert recorder.ended and len(recorder.chunks) == 1 + 5


def test_load_guide_attaches_an_adapter_for_the_same_base_to_the_loaded_base(tmp_path):
    from align.decoding.loading import load_guide
    from align.models import load_model

    base, tokenizer = tiny_causal_lm(seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    parm_arm().save_pretrained(tmp_path / "parm")
    loaded_base, _ = load_model(tmp_path / "base")
    guide, _ = load_guide(str(tmp_path / "parm"), str(tmp_path / "base"), base_model=loaded_base)
    assert guide.get_base_model() is loaded_base  # one copy of the weights, shared-base decoding
    separate, _ = load_guide(str(tmp_path / "parm"), str(tmp_path / "base"))
    assert separate.get_base_model() is not loaded_base


def _shared_parm():
    """A PARM on the very module used as the base (one stacked forward per step)."""
    torch.manual_seed(7)
    config = PBLoraConfig(objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0)
    arm = get_peft_model(tiny_causal_lm(seed=0)[0], config).eval()
    with torch.no_grad():
        for name, p in arm.named_parameters():
            if "pblora_B" in name:
                p.mul_(50)
    return arm.get_base_model(), parm_guidance(arm, beta=0.5)


@pytest.mark.parametrize("mode", ["parm", "parm-shared", "genarm", "mod"])
def test_a_sweep_in_one_pass_equals_each_alpha_alone_with_rows_leaving_at_eos(setup, mode):
    """repeats=K: the prompts' prefill shared across the α blocks, finished rows dropped from
    the batch; every row must still decode exactly as it does alone."""
    base, tokenizer, batch = setup
    if mode == "parm-shared":
        base, guidance = _shared_parm()
    else:
        guidance = guidance_for(mode)
    alphas = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    prompts = batch["input_ids"].shape[0]
    width = batch["input_ids"].shape[1]
    free = [decode(base, tokenizer, guidance, batch, a, steps=8) for a in alphas]
    # EOS: tokens some rows produce early, so rows finish at different steps.
    eos = sorted({int(free[0][0, width + 1]), int(free[2][1, width + 3])})
    kwargs = dict(max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    together = guided_decode(
        base,
        guidance,
        batch["input_ids"],
        batch["attention_mask"],
        alphas.repeat_interleave(prompts, dim=0),
        eos_token_id=eos,
        repeats=3,
        **kwargs,
    )
    assert together.shape[0] == 3 * prompts
    stopped_early = 0
    for k, alpha in enumerate(alphas):
        for i in range(prompts):
            alone = guided_decode(
                base,
                guidance,
                batch["input_ids"][i : i + 1],
                batch["attention_mask"][i : i + 1],
                alpha,
                eos_token_id=eos,
                **kwargs,
            )[0]
            row = together[k * prompts + i]
            assert torch.equal(row[: len(alone)], alone), (k, i)
            assert (row[len(alone) :] == tokenizer.pad_token_id).all()
            stopped_early += len(alone) < width + 8
    assert stopped_early >= 2  # the EOS choice did make rows leave the batch early
