from pathlib import Path

import pytest

from headrace.accounting.pricing import PriceTable
from headrace.domain import Price, Usage


def test_the_shipped_table_prices_known_models_and_their_dated_variants() -> None:
    table = PriceTable.load()
    mini = table.lookup("gpt-4o-mini")
    assert mini == Price(
        input_per_mtok=150_000, output_per_mtok=600_000, cached_input_per_mtok=75_000
    )
    assert table.lookup("gpt-4o-mini-2024-07-18") == mini  # longest prefix, not gpt-4o
    assert table.lookup("gpt-4o-2024-08-06").input_per_mtok == 2_500_000
    assert table.lookup("smollm2-135m-instruct") == Price()
    assert table.lookup("some-model-nobody-lists") == Price()


def test_a_config_file_extends_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("gpt-4o-mini: {input: 1, output: 2}\nmy-model: {input: 0.5}\n")
    table = PriceTable.load(path)
    assert table.lookup("gpt-4o-mini") == Price(1_000_000, 2_000_000)
    assert table.lookup("my-model") == Price(500_000, 0)
    assert table.lookup("gpt-4o").input_per_mtok == 2_500_000


def test_a_bad_table_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("gpt-4o: {inputs: 1}\n")
    with pytest.raises(ValueError, match="'gpt-4o' needs a mapping of input"):
        PriceTable.load(path)


@pytest.mark.parametrize(
    ("usage", "micro_usd"),
    [
        (Usage(1000, 500), 450),  # 1000 x 0.15 + 500 x 0.60 micro-dollars
        (Usage(1000, 500, cached_tokens=200), 435),  # 200 cached at 0.075
        (Usage(1, 0), 0),  # 0.15 micro-dollars rounds to 0
        (Usage(4, 0), 1),  # 0.6 rounds half up to 1
        (Usage(0, 0), 0),
    ],
)
def test_cost_in_integer_micro_dollars(usage: Usage, micro_usd: int) -> None:
    price = Price(input_per_mtok=150_000, output_per_mtok=600_000, cached_input_per_mtok=75_000)
    assert price.cost_micro_usd(usage) == micro_usd


def test_cached_tokens_bill_as_input_without_a_cached_rate() -> None:
    assert Price(1_000_000, 0).cost_micro_usd(Usage(10, 0, cached_tokens=10)) == 10
