"""Hugging Face sequence-classification reward models as scorers (batched, any device)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from align.scorers.base import Scorer, register_scorer

INPUT_FORMATS = ("auto", "chat", "pair", "concat")


@register_scorer("reward-model")
class RewardModelScorer(Scorer):
    """The scalar output of an ``AutoModelForSequenceClassification`` reward model.

    ``input_format`` says how a (prompt, response) pair is shown to the model:
    ``"chat"`` applies the tokenizer's chat template (user prompt, assistant response),
    ``"pair"`` encodes them as a text pair (e.g. OpenAssistant DeBERTa reward models),
    ``"concat"`` formats ``template`` (e.g. ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``),
    ``"auto"`` picks chat when the tokenizer has a template, else pair.
    """

    description = (
        "score from a Hugging Face sequence-classification reward model (reward-model:PATH)"
    )

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        max_length: int = 1024,
        input_format: str = "auto",
        template: str = "\n\nHuman: {prompt}\n\nAssistant: {response}",
        label_index: int = 0,
        negate: bool = False,
        show_progress: bool = False,
    ) -> None:
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if isinstance(model, str):
            from transformers import AutoModelForSequenceClassification

            from align.models import load_model

            model, tokenizer = load_model(
                model, dtype=dtype, model_class=AutoModelForSequenceClassification
            )
        if tokenizer is None:
            raise ValueError("a reward model given as an object needs its tokenizer")
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            # Sequence classifiers pool at the last non-pad token; they need the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = self.model.config.num_labels
        if not 0 <= label_index < num_labels:
            raise ValueError(
                f"label_index {label_index} out of range for a model with {num_labels} labels"
            )
        if input_format == "auto":
            input_format = "chat" if getattr(tokenizer, "chat_template", None) else "pair"
        if input_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "input_format='chat' but the reward model's tokenizer has no chat template"
            )
        self.input_format = input_format
        # A cost model (higher = worse, e.g. a harmfulness cost) scores an objective negated.
        self.sign = -1.0 if negate else 1.0
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.show_progress = show_progress

    def _encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        common = dict(
            padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if self.input_format == "pair":
            return self.tokenizer(prompts, responses, **common)
        if self.input_format == "chat":
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in zip(prompts, responses)
            ]
            # The template already carries any special tokens the model expects.
            return self.tokenizer(texts, add_special_tokens=False, **common)
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        return self.tokenizer(texts, **common)

    @torch.inference_mode()
    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        scores = []
        starts = range(0, len(responses), self.batch_size)
        for start in tqdm(starts, desc="reward model", disable=not self.show_progress):
            end = start + self.batch_size
            batch = self._encode(prompts[start:end], responses[start:end])
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            scores.append(logits[:, self.label_index].float().cpu())
        return self.sign * torch.cat(scores).numpy()
