"""Offline scorers built on shipped lexicons and classifiers: positivity, harmlessness, brevity."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from align.scorers.base import Scorer, register_scorer

_WORDS = re.compile(r"\w+|[^\w\s]")
_LETTER_WORDS = re.compile(r"[^\W\d_]+")


@register_scorer("positivity")
class PositivityScorer(Scorer):
    """VADER compound sentiment of the response, in [-1, 1]."""

    description = "VADER compound sentiment of the response, in [-1, 1]"
    bounds = (-1.0, 1.0)

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(text)["compound"] for text in responses])


@register_scorer("harmlessness")
class HarmlessnessScorer(Scorer):
    """1 − probability that the response is offensive (alt-profanity-check's linear model)."""

    description = (
        "1 - offensive-language probability of the response (alt-profanity-check), in [0, 1]"
    )
    bounds = (0.0, 1.0)

    def __init__(self) -> None:
        import warnings

        with warnings.catch_warnings():
            # The shipped pickle was made by another scikit-learn version; it loads fine.
            warnings.simplefilter("ignore")
            from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return 1.0 - np.asarray(self._predict_prob(responses), dtype=np.float64)


@register_scorer("brevity")
class BrevityScorer(Scorer):
    """1 − min(tokens, max_tokens) / max_tokens for an answer; 0 for a non-answer.

    A non-answer is a response with fewer than ``min_words`` words (runs of letters): the empty
    string, "Sure!", "Lemmage.". Without that floor, brevity is won by saying nothing — a guided
    decoder steered to "brief" learns to stop at once, and a front's brief end would be empty
    strings scored 1.0. An answer of ``min_words`` words or more scores by its length alone
    (``min_words=0`` restores the plain length score).

    Counts the model's tokens when given its tokenizer, else words and punctuation marks.
    """

    description = (
        "1 - min(tokens, max_tokens) / max_tokens, in [0, 1]; 0 for a non-answer "
        "(fewer than min_words words)"
    )
    bounds = (0.0, 1.0)

    def __init__(self, max_tokens: int = 128, tokenizer: Any = None, min_words: int = 3) -> None:
        if max_tokens < 1:
            raise ValueError(f"brevity max_tokens must be >= 1, got {max_tokens}")
        if min_words < 0:
            raise ValueError(f"brevity min_words must be >= 0, got {min_words}")
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.min_words = min_words

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is not None:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return np.array([len(row) for row in ids])
        return np.array([len(_WORDS.findall(text)) for text in texts])

    def is_answer(self, texts: list[str]) -> np.ndarray:
        """True for responses with at least ``min_words`` words."""
        return np.array([len(_LETTER_WORDS.findall(text)) >= self.min_words for text in texts])

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        counts = np.minimum(self.count_tokens(responses), self.max_tokens)
        return np.where(self.is_answer(responses), 1.0 - counts / self.max_tokens, 0.0)
