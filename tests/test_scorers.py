import numpy as np
import pytest
import torch

from align.scorers import RewardModelScorer, available_scorers, get_scorer


def test_registry_lists_the_offline_scorers_and_rejects_unknown_names():
    assert {"positivity", "harmlessness", "brevity", "relevance", "reward-model"} <= set(
        available_scorers()
    )
    with pytest.raises(ValueError, match="unknown scorer 'kindness'.*positivity"):
        get_scorer("kindness")


def test_scorer_checks_its_inputs():
    scorer = get_scorer("brevity")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="response 0 is int"):
        scorer.score(["a"], [3])
    assert scorer.score([], []).shape == (0,)


def test_positivity_orders_positive_above_neutral_above_negative():
    scores = get_scorer("positivity").score(
        ["How was it?"] * 3,
        [
            "It was wonderful, I loved every minute and the staff were so kind!",
            "It was on Tuesday and lasted two hours.",
            "It was awful, boring and a complete waste of money. I hated it.",
        ],
    )
    assert scores[0] > 0.5 > scores[1] > -0.5 > scores[2]
    assert np.all((scores >= -1) & (scores <= 1))


def test_harmlessness_orders_polite_above_offensive():
    scores = get_scorer("harmlessness").score(
        ["Reply to my neighbour."] * 2,
        [
            "Thank you for letting me know, I will keep the music down after ten.",
            "Shut up, you stupid idiot, nobody cares about your f***ing complaints.",
        ],
    )
    assert scores[0] > 0.8 and scores[1] < 0.5
    assert np.all((scores >= 0) & (scores <= 1))


def test_brevity_counts_words_or_model_tokens(tiny_lm):
    _, tokenizer = tiny_lm
    prompts = ["Say something."] * 3
    responses = ["Yes, it is.", "Yes, and here is a much longer answer with many words in it.", ""]
    words = get_scorer("brevity", max_tokens=10).score(prompts, responses)
    assert words.tolist() == pytest.approx([0.5, 0.0, 0.0])  # 5 words and marks; "" no answer
    tokens = get_scorer("brevity", max_tokens=100, tokenizer=tokenizer).score(prompts, responses)
    n_yes = len(tokenizer("Yes, it is.", add_special_tokens=False)["input_ids"])
    assert tokens[0] == pytest.approx(1 - n_yes / 100)
    assert tokens[0] > tokens[1] and tokens[2] == 0.0
    with pytest.raises(ValueError, match="max_tokens"):
        get_scorer("brevity", max_tokens=0)
    with pytest.raises(ValueError, match="min_words"):
        get_scorer("brevity", min_words=-1)


@pytest.mark.parametrize("non_answer", ["", "   ", "Sure!", "Lemmage.", "42 ... !", "Yes, yes"])
def test_brevity_gives_a_non_answer_no_credit(non_answer):
    """Saying nothing (or two words) must not win the brief objective."""
    scorer = get_scorer("brevity", max_tokens=48)
    real = "Rain taps on the window."
    scores = scorer.score(["Describe rain."] * 2, [non_answer, real])
    assert scores[0] == 0.0 < scores[1]
    # min_words=0: the plain length score, under which the non-answer would have won.
    plain = get_scorer("brevity", max_tokens=48, min_words=0).score(["q"] * 2, [non_answer, real])
    assert plain[0] > plain[1]


def test_offline_scorers_declare_their_natural_range():
    assert get_scorer("positivity").bounds == (-1.0, 1.0)
    assert get_scorer("brevity").bounds == (0.0, 1.0)
    assert get_scorer("harmlessness").bounds == (0.0, 1.0)
    assert get_scorer("relevance").bounds == (-1.0, 1.0)


def test_relevance_prefers_the_on_topic_answer():
    prompt = "How do I bake a loaf of bread at home?"
    scores = get_scorer("relevance").score(
        [prompt] * 2,
        [
            "Mix flour, water, salt and yeast, knead the dough, let it rise, then bake it at 220 C.",
            "The stock market closed lower today as technology shares fell.",
        ],
    )
    assert scores[0] > scores[1] + 0.3
    assert np.all(np.abs(scores) <= 1 + 1e-6)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from align.testing import tiny_reward_model

    model, tokenizer = tiny_reward_model(seed=3)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = [
    "How are you?",
    "Tell me a long story about a dragon and a castle.",
    "Hi",
    "Why is the sky blue?",
]
RESPONSES = [
    "Fine.",
    "Once upon a time a dragon guarded a castle on a hill for a hundred years.",
    "Hello!",
    "Rayleigh scattering.",
]


def test_reward_model_scores_equal_the_model_run_one_example_at_a_time(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = get_scorer(f"reward-model:{reward_model_dir}", batch_size=3)
    assert scorer.input_format == "chat"  # the tokenizer has a chat template
    batched = scorer.score(PROMPTS, RESPONSES)

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected.append(model(**ids).logits[0, 0].item())
    # Padding and batching must not change any score.
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(batched, 6))) == len(PROMPTS)  # a real model, not a constant
    # A cost model scores its objective negated.
    cost = get_scorer(f"reward-model:{reward_model_dir}", batch_size=3, negate=True)
    np.testing.assert_allclose(cost.score(PROMPTS, RESPONSES), -batched, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("input_format", ["pair", "concat"])
def test_reward_model_input_formats_are_batch_invariant(reward_model_dir, input_format):
    one = RewardModelScorer(str(reward_model_dir), input_format=input_format, batch_size=1)
    many = RewardModelScorer(str(reward_model_dir), input_format=input_format, batch_size=4)
    np.testing.assert_allclose(
        one.score(PROMPTS, RESPONSES), many.score(PROMPTS, RESPONSES), rtol=1e-4, atol=1e-5
    )


def test_reward_model_rejects_bad_options(reward_model_dir):
    with pytest.raises(ValueError, match="input_format"):
        RewardModelScorer(str(reward_model_dir), input_format="xml")
    with pytest.raises(ValueError, match="label_index 2"):
        RewardModelScorer(str(reward_model_dir), label_index=2)
