"""Cost-aware model selection rules."""

from __future__ import annotations

from headrace.domain import ChatRequest, Principal, Role
from headrace.gateway.selection import ModelSelector, SelectionRule


def chat(model: str = "gpt-4o", text: str = "hi", **body: object) -> ChatRequest:
    messages = [{"role": "user", "content": text}]
    return ChatRequest(model=model, messages=messages, body={"model": model, **body})


def tokens(request: ChatRequest) -> int:
    return sum(len(str(m["content"]).split()) for m in request.messages)


RULES = ModelSelector(
    [
        SelectionRule(name="tools-strong", use="strong", tools=True),
        SelectionRule(name="free-tier", use="cheap", key_tiers=frozenset({"free"})),
        SelectionRule(name="asked-cheap", use="cheap", headers={"x-headrace-route": "cheap"}),
        SelectionRule(name="short", use="cheap", models=("gpt-4*",), max_prompt_tokens=5),
        SelectionRule(name="images", use="vision", images=True),
    ]
)


def select(request: ChatRequest, tier: str | None = None, **headers: str) -> tuple[str, str | None]:
    metadata = {"tier": tier} if tier else {}
    p = Principal(key_id="k", role=Role.USER, metadata=metadata)
    return RULES.select(request, p, headers, lambda: tokens(request))


def test_short_prompts_go_to_the_cheap_model_long_ones_stay() -> None:
    assert select(chat(text="what is 2+2")) == ("cheap", "short")
    long = " ".join(["word"] * 50)
    assert select(chat(text=long)) == ("gpt-4o", None)


def test_patterns_limit_a_rule_to_some_requested_models() -> None:
    assert select(chat(model="claude", text="hi")) == ("claude", None)


def test_tools_tier_and_header_rules_match_in_order() -> None:
    assert select(chat(text="hi", tools=[{"type": "function"}])) == ("strong", "tools-strong")
    assert select(chat(text=" ".join(["w"] * 50)), tier="free") == ("cheap", "free-tier")
    long = chat(text=" ".join(["w"] * 50))
    assert select(long, **{"x-headrace-route": "cheap"}) == ("cheap", "asked-cheap")


def test_images_are_detected_in_content_parts() -> None:
    parts = [
        {"type": "text", "text": " ".join(["w"] * 50)},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ]
    request = ChatRequest(model="x", messages=[{"role": "user", "content": parts}], body={})
    assert RULES.select(request, None, {}, lambda: 50) == ("vision", "images")


def test_the_tokenizer_runs_only_when_a_rule_needs_it() -> None:
    calls: list[int] = []

    def counting() -> int:
        calls.append(1)
        return 1

    selector = ModelSelector([SelectionRule(name="h", use="c", headers={"x-headrace-a": "1"})])
    assert selector.select(chat(), None, {}, counting) == ("gpt-4o", None)
    assert calls == []
