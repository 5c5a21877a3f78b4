"""Cost-aware model selection: rules that pick the model for a request by what it asks.

A rule matches on the requested model (names or ``fnmatch`` patterns), the prompt's size in
tokens, whether it carries tools or images, ``X-Headrace-*`` request headers, and the key's
``tier`` metadata; the first matching rule's ``use`` model serves the request. "Short simple
prompts to a cheap model, long ones to a strong one" is two rules. The client's model stays on
the usage record as ``requested_model``, so reports show what the rules saved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from headrace.domain import ChatRequest, Principal


@dataclass(frozen=True, slots=True)
class SelectionRule:
    name: str
    use: str
    models: tuple[str, ...] = ()
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    tools: bool | None = None
    images: bool | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    key_tiers: frozenset[str] = frozenset()

    @property
    def counts_tokens(self) -> bool:
        return self.min_prompt_tokens is not None or self.max_prompt_tokens is not None


def _has_images(request: ChatRequest) -> bool:
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(part, Mapping) and part.get("type") in ("image_url", "input_image")
            for part in content
        ):
            return True
    return False


class ModelSelector:
    """Applies the rules in order; :meth:`select` returns the model to use."""

    def __init__(self, rules: Sequence[SelectionRule]) -> None:
        self._rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def select(
        self,
        request: ChatRequest,
        principal: Principal | None,
        headers: Mapping[str, str],
        prompt_tokens: Callable[[], int],
    ) -> tuple[str, str | None]:
        """``(model, rule name)``; the requested model and None when no rule matches.

        ``prompt_tokens`` is called only if a rule needs the count (it runs the tokenizer).
        """
        tier = principal.metadata.get("tier") if principal is not None else None
        for rule in self._rules:
            if rule.models and not any(fnmatchcase(request.model, p) for p in rule.models):
                continue
            if rule.key_tiers and tier not in rule.key_tiers:
                continue
            if any(headers.get(name) != value for name, value in rule.headers.items()):
                continue
            if rule.tools is not None and rule.tools != bool(request.body.get("tools")):
                continue
            if rule.images is not None and rule.images != _has_images(request):
                continue
            if rule.counts_tokens:
                count = prompt_tokens()
                if rule.min_prompt_tokens is not None and count < rule.min_prompt_tokens:
                    continue
                if rule.max_prompt_tokens is not None and count > rule.max_prompt_tokens:
                    continue
            return rule.use, rule.name
        return request.model, None
