"""The one decoder (:class:`DecodingBatch`): its rows' own settings, the rules that end a row,
when finished rows leave, models weighted 0 on every row, and seeded sampling.

The formula itself is checked against an uncached reference in ``test_guided_decoding.py``,
and rows joining a running batch in ``test_serve.py``."""

import pytest
import torch

from align.decoding import (
    DecodingBatch,
    RowSettings,
    Sampler,
    genarm_guidance,
    guided_generate,
)
from align.testing import tiny_causal_lm
from tests.test_guided_decoding import PROMPTS, reference_greedy, tiny


@pytest.fixture(scope="module")
def models():
    base, tokenizer = tiny_causal_lm(seed=0)
    return base, tokenizer, genarm_guidance({"helpful": tiny(2), "harmless": tiny(3)}, beta=0.5)


def _prompt(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode_all(batch):
    """Advance until every row is done; every row's tokens."""
    answers = {}
    while batch.unfinished:
        answers.update(batch.advance().finished)
    return answers


def test_each_row_ends_by_its_own_rules_and_the_others_decode_on_unchanged(models):
    """Budget, end-of-sequence id (kept as the last token) and a stop callback end rows at
    their own step; the free row's tokens are those it decodes alone; how finished rows wait
    or leave changes no row's tokens."""
    base, tokenizer, guidance = models
    prompt = _prompt(tokenizer, PROMPTS[2])
    alpha = [0.5, 0.5]

    def free(steps=10):
        with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
            batch.add(["free"], [prompt], alpha, RowSettings(max_new_tokens=steps))
            return _decode_all(batch)["free"]

    tokens = free()
    assert len(tokens) == 10
    eos = next(t for k, t in enumerate(tokens) if k >= 2 and t not in tokens[:k])
    stop_at = tokens.index(eos)
    told = []

    def on_token(token):
        told.append(token)
        return len(told) == 4

    rows = {
        "budget": RowSettings(max_new_tokens=3),
        "eos": RowSettings(max_new_tokens=10, eos_token_ids={eos}),
        "callback": RowSettings(on_token=on_token),
        "free": RowSettings(max_new_tokens=10),
    }
    for drop in (0.0, 0.5, None):
        told.clear()
        with DecodingBatch(base, guidance, vocab_size=len(tokenizer), drop_finished=drop) as batch:
            batch.add(list(rows), [prompt] * 4, alpha, list(rows.values()))
            answers, sizes = {}, []
            while batch.unfinished:
                step = batch.advance()
                assert set(step.keys) <= set(rows) and len(step.keys) == len(step.tokens)
                answers.update(step.finished)
                sizes.append(len(batch))
            assert len(batch) == 0  # the last rows to finish left too
        assert answers["budget"] == tokens[:3], drop
        assert answers["eos"] == tokens[: stop_at + 1], drop
        assert answers["callback"] == tokens[:4] == told, drop
        assert answers["free"] == tokens, drop
        if drop == 0.0:  # a finished row leaves at once
            lengths = [len(a) for a in answers.values()]
            assert sizes == [sum(n > s + 1 for n in lengths) for s in range(10)]
        if drop is None:  # finished rows wait for the others
            assert set(sizes[:-1]) == {4}


def test_a_model_weighted_zero_on_every_row_does_not_run(models):
    """At α = (1, 0) the second ARM is weighted 0 on every row: no forward of it (not even on
    the prompts), and the tokens are the no-cache reference's."""
    base, tokenizer, guidance = models
    calls = []
    hook = guidance.models[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        texts = [PROMPTS[0], PROMPTS[2]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as decoder:
            prompts = [ids[mask.bool()] for ids, mask in zip(batch.input_ids, batch.attention_mask)]
            decoder.add([0, 1], prompts, [1.0, 0.0], RowSettings(max_new_tokens=6))
            answers = _decode_all(decoder)
    finally:
        hook.remove()
    assert not calls
    alpha = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    reference = reference_greedy(base, guidance, batch.input_ids, batch.attention_mask, alpha, 6)
    width = batch.input_ids.shape[1]
    assert [answers[0], answers[1]] == reference[:, width:].tolist()


def test_a_seeded_sampled_answer_does_not_depend_on_what_decodes_beside_it(models):
    """guided_generate seeds answer r with seed + r: the answer to a prompt is the same alone
    (seeded to its place) or in a batch, and another seed changes it."""
    base, tokenizer, guidance = models
    options = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    together = guided_generate(base, tokenizer, PROMPTS, guidance, [0.5, 0.5], seed=11, **options)
    alone = [
        guided_generate(base, tokenizer, [p], guidance, [0.5, 0.5], seed=11 + i, **options)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert together == alone
    other = guided_generate(base, tokenizer, PROMPTS, guidance, [0.5, 0.5], seed=12, **options)
    assert other != together


def test_rows_without_a_generator_draw_together_and_greedy_rows_stay_greedy(models):
    """Unseeded rows of the same settings share one draw from torch's generator (seeded here),
    reproducibly; a greedy row beside them takes its argmax."""
    base, tokenizer, guidance = models
    prompt = _prompt(tokenizer, PROMPTS[2])

    def run():
        torch.manual_seed(5)
        with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
            settings = [RowSettings(Sampler(2.0), max_new_tokens=8)] * 2
            settings.append(RowSettings(max_new_tokens=8))
            batch.add(["a", "b", "greedy"], [prompt] * 3, [0.5, 0.5], settings)
            return _decode_all(batch)

    first = run()
    assert first == run()
    assert first["a"] != first["b"]  # two rows, two draws
    with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
        batch.add(["g"], [prompt], [0.5, 0.5], RowSettings(max_new_tokens=8))
        assert _decode_all(batch)["g"] == first["greedy"]


def test_bad_row_settings_are_clear_errors(models):
    base, tokenizer, guidance = models
    with pytest.raises(ValueError, match="max_new_tokens"):
        RowSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="drop_finished"):
        DecodingBatch(base, guidance, vocab_size=len(tokenizer), drop_finished=2.0)
    with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
        with pytest.raises(ValueError, match="2 row settings for 1 rows"):
            batch.add(["a"], [[1, 2]], [0.5, 0.5], [RowSettings(), RowSettings()])
        with pytest.raises(ValueError, match="repeats"):
            batch.add(["a"], [[1, 2]], [0.5, 0.5], repeats=0)
        with pytest.raises(ValueError, match="3 keys for 1 prompts × 2 repeats"):
            batch.add(["a", "b", "c"], [[1, 2]], [0.5, 0.5], repeats=2)
        with pytest.raises(RuntimeError, match="no rows"):
            batch.advance()
