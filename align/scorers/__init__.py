"""Scorers: named functions ``score(prompts, responses) -> array`` (higher is better).

Offline scorers that work with no network: ``positivity`` (VADER), ``harmlessness``
(alt-profanity-check), ``brevity`` (token count), ``relevance`` (MiniLM cosine); and
``reward-model`` for any Hugging Face sequence-classification reward model.
"""

from align.scorers.base import Scorer, available_scorers, get_scorer, register_scorer
from align.scorers.lexical import BrevityScorer, HarmlessnessScorer, PositivityScorer
from align.scorers.relevance import RelevanceScorer
from align.scorers.reward_model import RewardModelScorer

__all__ = [
    "BrevityScorer",
    "HarmlessnessScorer",
    "PositivityScorer",
    "RelevanceScorer",
    "RewardModelScorer",
    "Scorer",
    "available_scorers",
    "get_scorer",
    "register_scorer",
]
