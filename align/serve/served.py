"""What ``align serve`` serves: one route of the sweep, built from the same spec and Runtime.

A route spec is what ``align evaluate`` configs list under ``routes:`` —
``{kind: parm, adapter: ..., beta: ...}``, ``{kind: genarm, arms: {objective: folder}, beta:
...}``, ``{kind: mod, policies: {objective: folder}}`` or ``{kind: policy, adapter: ...}`` —
and the frozen base is loaded once by the sweep's :class:`~align.sweep.routes.Runtime`; the
route's :meth:`~align.sweep.routes.Route.per_row_guidance` hands over the
:class:`~align.decoding.guided.Guidance` that decodes it at a per-row α.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align.decoding import DecodingBatch, check_same_tokenizer
from align.preference import Preference, require_same_objectives
from align.sweep import routes as _routes

# The one use of the routes module: its lookup function and its shared Runtime.
build_route = _routes.build_route
Runtime = _routes.Runtime

DEFAULT_MAX_TOKENS = 256


class ServedModel:
    """A frozen base and the route guiding it, ready to decode requests in a batch."""

    def __init__(
        self,
        route: Mapping[str, Any],
        *,
        base: str = "smollm2-135m-instruct",
        objectives: Sequence[str] | None = None,
        preference: Any = None,
        name: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_context: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ):
        if not isinstance(route, Mapping) or "kind" not in route:
            raise ValueError(
                f"a route is a mapping with a `kind` (parm, genarm, mod, policy), got {route!r}"
            )
        spec = dict(route)
        objectives = tuple(objectives) if objectives else objectives_of_spec(spec)
        self.route = build_route(spec, objectives, {})
        self.runtime = Runtime(base, device=device, dtype=dtype)
        try:
            self.guidance = self.route.per_row_guidance(self.runtime)
        except Exception:
            self.route.close()
            raise
        require_same_objectives(
            self.guidance.objectives, objectives, f"the {self.route.kind} route", "--objectives"
        )
        self.objectives = self.guidance.objectives
        self.tokenizer = self.runtime.tokenizer
        # The event loop encodes while the model thread decodes: a fast tokenizer's Rust
        # object must not be borrowed by both at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        for index, other in enumerate(self.guidance.tokenizers):
            if other is not None:
                check_same_tokenizer(self.tokenizer, other, f"guiding model {index}")
        self.base_name = base
        self.base = self.runtime.model if self.guidance.needs_base else None
        self.name = name or spec.get("name") or f"align-{self.route.kind}"
        self.default_preference = (
            Preference.uniform(self.objectives)
            if preference is None
            else Preference.coerce(preference, self.objectives)
        )
        if self.default_preference.is_batched:
            raise ValueError("the default preference must be one α, not a batch")
        model = self.guidance.models[0] if self.base is None else self.base
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_context = int(max_context or limit or 2048)
        if limit and self.max_context > limit:
            raise ValueError(
                f"max context {self.max_context} exceeds the model's {limit} positions"
            )
        if default_max_tokens < 1:
            raise ValueError(f"default max tokens must be >= 1, got {default_max_tokens}")
        self.default_max_tokens = default_max_tokens
        self.eos_token_ids = _eos_ids(self.tokenizer, model)

    # --- prompts ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Any]) -> list[int]:
        """Token ids of a conversation, the assistant's turn opened (the chat template)."""
        turns = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages
        ]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
            with self._tokenizer_lock:
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.encode_text("\n".join(t["content"] for t in turns))

    def encode_text(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (no chat template)."""
        with self._tokenizer_lock:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )

    # --- decoding --------------------------------------------------------------------------
    def new_batch(self) -> DecodingBatch:
        # A finished request's row leaves at once: its slot is free for the next request.
        pad = self.tokenizer.pad_token_id
        return DecodingBatch(
            self.base,
            self.guidance,
            vocab_size=len(self.tokenizer),
            pad_token_id=0 if pad is None else pad,
            drop_finished=0.0,
        )

    def card(self) -> dict[str, Any]:
        """What ``/v1/models`` says about the served model, beyond OpenAI's fields."""
        return {
            "objectives": list(self.objectives),
            "default_preference": self.default_preference.to_dict(),
            "route": self.route.describe(),
            "base": self.base_name,
            "max_context": self.max_context,
        }

    def close(self) -> None:
        self.route.close()


def objectives_of_spec(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The objectives a route spec names: the keys of its ``arms`` (GenARM) or ``policies``
    (MOD; ``arms`` there too, its other name), or those recorded in its adapter's
    ``adapter_config.json`` (PARM, policy)."""
    for field in ("arms", "policies"):
        folders = spec.get(field)
        if isinstance(folders, Mapping) and folders:
            return tuple(str(k) for k in folders)
    adapter = spec.get("adapter")
    if adapter is not None:
        config = Path(str(adapter)).expanduser() / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no adapter_config.json in {adapter} (the route's adapter)")
        names = json.loads(config.read_text()).get("objectives")
        if names:
            return tuple(names)
    raise ValueError(
        f"cannot tell the objectives of route {dict(spec)}: a served route is parm or policy "
        "(`adapter`: its adapter_config.json names them), genarm (`arms`: one per objective) or "
        "mod (`policies`: one per objective); or give them (--objectives a,b)"
    )


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
