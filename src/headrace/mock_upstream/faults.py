"""What can go wrong on the mock upstream, and the pure per-request decision of what does.

A :class:`FaultConfig` is a frozen value: the server swaps the whole value when
``PUT /_mock/faults`` arrives, never mutates it. :func:`decide` turns a config, a
``random.Random`` and the optional per-request override headers into a :class:`Decision`.
It does no I/O and draws only from the generator it is given, so a seeded generator
gives the same sequence of decisions every run.

Rates are probabilities per request and are mutually exclusive: one uniform draw ``u``
picks an error when ``u < error_rate``, a hang in the next ``hang_rate`` of the unit
interval, then a cut, then malformed output. Their sum must therefore stay at or below 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum

__all__ = [
    "Decision",
    "FaultConfig",
    "FaultKind",
    "LatencyDist",
    "decide",
    "format_statuses",
    "parse_fault_header",
    "parse_statuses",
]


class LatencyDist(StrEnum):
    """How ``latency_jitter_ms`` spreads the latency around ``latency_ms``.

    ``uniform``: ``latency_ms`` ± up to ``latency_jitter_ms``, uniformly.
    ``normal``: a normal distribution, mean ``latency_ms``, standard deviation
    ``latency_jitter_ms``. ``fixed``: exactly ``latency_ms`` (jitter must be 0).
    Draws below zero become zero.
    """

    FIXED = "fixed"
    UNIFORM = "uniform"
    NORMAL = "normal"


class FaultKind(StrEnum):
    """The one fault a request gets. ``none`` answers normally."""

    NONE = "none"
    ERROR = "error"
    HANG = "hang"
    CUT = "cut"
    MALFORMED = "malformed"


_DEFAULT_STATUSES: tuple[tuple[int, float], ...] = ((429, 1.0), (500, 1.0), (503, 1.0))


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """The fault settings, named like the CLI flags (``--error-rate`` is ``error_rate``).

    Times are milliseconds (``*_ms``) or seconds (``*_s``); rates are probabilities in
    [0, 1]. ``error_statuses`` holds ``(status, weight)`` pairs; an injected error picks
    a status with probability proportional to its weight. The default is no fault at all.
    Construction raises ``ValueError`` with a message naming the field and the fix.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    latency_dist: LatencyDist = LatencyDist.UNIFORM
    ttft_ms: float = 0.0
    inter_chunk_ms: float = 0.0
    error_rate: float = 0.0
    error_statuses: tuple[tuple[int, float], ...] = field(default=_DEFAULT_STATUSES)
    retry_after_s: float = 1.0
    hang_rate: float = 0.0
    cut_rate: float = 0.0
    malformed_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_jitter_ms", "ttft_ms", "inter_chunk_ms"):
            _check_non_negative(name, getattr(self, name))
        _check_non_negative("retry_after_s", self.retry_after_s)
        for name in ("error_rate", "hang_rate", "cut_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is {value}; give a probability between 0 and 1")
        total = self.error_rate + self.hang_rate + self.cut_rate + self.malformed_rate
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"error_rate + hang_rate + cut_rate + malformed_rate is {total:g}; faults are "
                "mutually exclusive per request, so lower them to sum to 1 or less"
            )
        if self.latency_dist is LatencyDist.FIXED and self.latency_jitter_ms > 0:
            raise ValueError(
                "latency_jitter_ms has no effect with latency_dist=fixed; "
                "use latency_dist=uniform or normal, or set the jitter to 0"
            )
        if not self.error_statuses:
            raise ValueError("error_statuses is empty; give at least one, e.g. '429,500,503'")
        for status, weight in self.error_statuses:
            _check_status(status)
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"error status {status} has weight {weight}; use a weight > 0")

    def to_json(self) -> dict[str, float | str]:
        """The config as JSON-ready values, the shape :meth:`from_json` reads back."""
        out: dict[str, float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "error_statuses":
                out[f.name] = format_statuses(value)
            elif isinstance(value, LatencyDist):
                out[f.name] = value.value
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(
        cls, data: Mapping[str, object], *, base: FaultConfig | None = None
    ) -> FaultConfig:
        """Read the fields in ``data`` over ``base`` (defaults if ``None``).

        Keys are the field names; the CLI spelling (``error-rate``) is accepted too.
        ``error_statuses`` may be a string like ``"429:2,500"``, a list of statuses, or
        an object mapping status to weight. Unknown keys and wrong types raise
        ``ValueError``.
        """
        known = {f.name for f in fields(cls)}
        changes: dict[str, object] = {}
        for raw_key, value in data.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ValueError(
                    f"unknown fault setting {raw_key!r}; known settings: {', '.join(sorted(known))}"
                )
            changes[key] = _coerce(key, value)
        # _coerce checked each value against its field; mypy cannot follow that.
        return replace(base if base is not None else cls(), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one request.

    ``status`` is the HTTP status of an injected error (``fault`` is ``error``), else 0.
    ``latency_s`` is the wait before the response headers, in seconds.
    """

    fault: FaultKind = FaultKind.NONE
    status: int = 0
    latency_s: float = 0.0


def decide(
    config: FaultConfig,
    rng: random.Random,
    *,
    forced: tuple[FaultKind, int] | None = None,
    forced_latency_ms: float | None = None,
) -> Decision:
    """Pick the fault and latency for one request.

    ``forced`` (from :func:`parse_fault_header`) replaces the rate-based choice and
    ``forced_latency_ms`` replaces the latency draw; whatever is forced draws nothing
    from ``rng``. Under a config with no rates and no jitter nothing is ever drawn.
    """
    if forced_latency_ms is not None:
        latency_ms = forced_latency_ms
    elif config.latency_jitter_ms > 0 and config.latency_dist is not LatencyDist.FIXED:
        latency_ms = _draw_latency_ms(config, rng)
    else:
        latency_ms = config.latency_ms
    latency_s = latency_ms / 1000.0
    if forced is not None:
        return Decision(forced[0], forced[1], latency_s)
    if config.error_rate + config.hang_rate + config.cut_rate + config.malformed_rate <= 0:
        return Decision(FaultKind.NONE, 0, latency_s)
    u = rng.random()
    for rate, kind in (
        (config.error_rate, FaultKind.ERROR),
        (config.hang_rate, FaultKind.HANG),
        (config.cut_rate, FaultKind.CUT),
        (config.malformed_rate, FaultKind.MALFORMED),
    ):
        if u < rate:
            return Decision(
                kind, _draw_status(config, rng) if kind is FaultKind.ERROR else 0, latency_s
            )
        u -= rate
    return Decision(FaultKind.NONE, 0, latency_s)


def parse_fault_header(value: str) -> tuple[FaultKind, int]:
    """Read an ``X-Mock-Fault`` value: a status (``429``), ``hang``, ``cut``, ``malformed``
    or ``none``. Raises ``ValueError`` naming the accepted values."""
    text = value.strip().lower()
    if text.isdigit():
        status = int(text)
        _check_status(status)
        return FaultKind.ERROR, status
    try:
        kind = FaultKind(text)
    except ValueError:
        raise ValueError(
            f"X-Mock-Fault {value!r} is not a fault; use an HTTP status 400-599, "
            "'hang', 'cut', 'malformed' or 'none'"
        ) from None
    if kind is FaultKind.ERROR:
        raise ValueError("X-Mock-Fault 'error' needs a status; send e.g. '500' instead")
    return kind, 0


def parse_statuses(text: str) -> tuple[tuple[int, float], ...]:
    """Read ``"429,500,503"`` (equal weights) or ``"429:2,500:1"`` into ``(status, weight)``."""
    pairs: list[tuple[int, float]] = []
    for raw_item in text.split(","):
        item = raw_item.strip()
        if not item:
            continue
        status_text, _, weight_text = item.partition(":")
        try:
            status = int(status_text)
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(
                f"error status {item!r} is not 'STATUS' or 'STATUS:WEIGHT', e.g. '429:2,500:1'"
            ) from None
        pairs.append((status, weight))
    return tuple(pairs)


def format_statuses(pairs: tuple[tuple[int, float], ...]) -> str:
    """The inverse of :func:`parse_statuses`; weights are omitted when all are equal."""
    if len({weight for _, weight in pairs}) <= 1:
        return ",".join(str(status) for status, _ in pairs)
    return ",".join(f"{status}:{weight:g}" for status, weight in pairs)


def _draw_status(config: FaultConfig, rng: random.Random) -> int:
    statuses = [status for status, _ in config.error_statuses]
    weights = [weight for _, weight in config.error_statuses]
    return rng.choices(statuses, weights)[0]


def _draw_latency_ms(config: FaultConfig, rng: random.Random) -> float:
    if config.latency_dist is LatencyDist.NORMAL:
        value = rng.gauss(config.latency_ms, config.latency_jitter_ms)
    else:
        jitter = config.latency_jitter_ms
        value = config.latency_ms + rng.uniform(-jitter, jitter)
    return max(0.0, value)


def _check_non_negative(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} is {value}; give a finite number >= 0")


def _check_status(status: int) -> None:
    if not 400 <= status <= 599:
        raise ValueError(f"error status {status} is not an HTTP error; use 400-599")


def _coerce(key: str, value: object) -> object:
    """Check one JSON value for field ``key`` and convert it to the field's type."""
    if key == "latency_dist":
        if not isinstance(value, str):
            raise ValueError("latency_dist must be one of 'fixed', 'uniform', 'normal'")
        try:
            return LatencyDist(value)
        except ValueError:
            raise ValueError(
                f"latency_dist {value!r} is unknown; use 'fixed', 'uniform' or 'normal'"
            ) from None
    if key == "error_statuses":
        return _coerce_statuses(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _coerce_statuses(value: object) -> tuple[tuple[int, float], ...]:
    if isinstance(value, str):
        return parse_statuses(value)
    if isinstance(value, list) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in value
    ):
        return tuple((int(s), 1.0) for s in value)
    if isinstance(value, dict):
        pairs: list[tuple[int, float]] = []
        for status, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"error_statuses weight for {status} must be a number")
            try:
                pairs.append((int(status), float(weight)))
            except ValueError:
                raise ValueError(f"error_statuses key {status!r} is not a status") from None
        return tuple(pairs)
    raise ValueError(
        "error_statuses must be a string like '429:2,500', a list of statuses, "
        "or an object mapping status to weight"
    )
