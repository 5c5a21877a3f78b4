"""Children: a labelled metric's child made once per label values, the same one labels() gives."""

from __future__ import annotations

from headrace.observability.metrics import Children, Metrics


def test_each_child_is_made_once_and_is_the_metrics_own() -> None:
    metrics = Metrics()
    made: list[tuple[str, ...]] = []
    labels = metrics.tokens.labels

    def counted(*values: str) -> object:
        made.append(values)
        return labels(*values)

    metrics.tokens.labels = counted  # type: ignore[method-assign]
    children = Children(metrics.tokens)
    first = children("chat", "m", "input")
    assert children("chat", "m", "input") is first
    assert children("chat", "m", "output") is not first
    assert made == [("chat", "m", "input"), ("chat", "m", "output")]
    assert first is labels("chat", "m", "input")
    first.observe(12)
    rendered = metrics.render().decode()
    assert (
        'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="m",'
        'gen_ai_token_type="input"} 1.0' in rendered
    )
