"""The price table: what a deployment's tokens cost, in integer micro-dollars.

A shipped table (``prices.yaml``, USD per million input, cached-input and output tokens by
upstream model name) that a config file can extend or override; a deployment's own ``price``
wins over both. Names match exactly or by the longest listed prefix, so dated variants
(``gpt-4o-mini-2024-07-18``) find their family.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from importlib import resources
from pathlib import Path

import yaml

from headrace.domain import Price

MICRO = Decimal(1_000_000)


def _micro(value: object) -> int:
    return int((Decimal(str(value)) * MICRO).to_integral_value())


def _parse(raw: object, source: str) -> dict[str, Price]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: the price table must map model names to prices")
    table = {}
    for model, entry in raw.items():
        if not isinstance(entry, Mapping) or not set(entry) <= {"input", "cached_input", "output"}:
            raise ValueError(
                f"{source}: {model!r} needs a mapping of input, cached_input and output "
                "(USD per million tokens)"
            )
        cached = entry.get("cached_input")
        table[str(model)] = Price(
            input_per_mtok=_micro(entry.get("input", 0)),
            output_per_mtok=_micro(entry.get("output", 0)),
            cached_input_per_mtok=None if cached is None else _micro(cached),
        )
    return table


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        self._by_length = sorted(self._prices, key=len, reverse=True)

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The shipped table, extended and overridden by ``override`` (same YAML format)."""
        shipped = resources.files("headrace.accounting").joinpath("prices.yaml").read_text()
        prices = _parse(yaml.safe_load(shipped), "prices.yaml")
        if override is not None:
            prices.update(_parse(yaml.safe_load(override.read_text()), str(override)))
        return cls(prices)

    def lookup(self, model: str) -> Price:
        """The price of ``model`` (exact, else longest prefix); zero when unlisted."""
        price = self._prices.get(model)
        if price is not None:
            return price
        for name in self._by_length:
            if model.startswith(name):
                return self._prices[name]
        return Price()
