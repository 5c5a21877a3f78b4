"""Wire shapes of the tenancy admin API (teams, keys, usage) and their converters.

Kept apart from the domain types (:class:`~headrace.domain.Team`, :class:`~headrace.domain.ApiKey`,
:class:`~headrace.store.base.UsageRow`): the wire speaks decimal dollars (at most 6 decimal
places), ISO 8601 times and flat limit fields; the domain speaks integer micro-dollars, unix
seconds and a :class:`~headrace.domain.Quota`.

Request bodies are strict (``extra="forbid"``): a misspelt field is a 400 naming it, not a
silently ignored limit. A PATCH body names only the fields it changes; ``null`` clears a
field (a limit becomes "no limit"). Views never carry a key's secret or its hash.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)

from headrace.api.wire import invalid  # the one way validation errors become 400s
from headrace.domain import NO_QUOTA, ApiKey, BudgetPeriod, Quota, Role, Team
from headrace.errors import InvalidRequestError, ValidationFailedError
from headrace.store.base import GroupBy, UsageRow

TEAM_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MICRO = 1_000_000  # micro-dollars per dollar


# -- field types ----------------------------------------------------------------------------


def _unix_seconds(value: object) -> object:
    """ISO 8601 (``2027-01-31``, ``2027-01-31T12:00:00Z``; no zone means UTC) or unix seconds
    (a number or a string of digits) → unix seconds."""
    if isinstance(value, bool):
        raise ValueError("expected an ISO 8601 time or unix seconds")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return float(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                "expected an ISO 8601 time such as 2027-01-31T00:00:00Z, or unix seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return value


def _day(value: str) -> str:
    try:
        date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a calendar day; use YYYY-MM-DD") from None
    return value


def _by_day() -> list[GroupBy]:
    return ["day"]


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# The store keeps limits in 32-bit INTEGER columns: a larger one is a 400, not a 500.
Rate = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
Dollars = Annotated[Decimal, Field(ge=0, le=1_000_000_000, decimal_places=6)]
Ratio = Annotated[float, Field(gt=0, le=1)]
UnixSeconds = Annotated[float, BeforeValidator(_unix_seconds), Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=200)]
Metadata = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=1024)]
    ],
    Field(max_length=64),
]
ModelPattern = Annotated[str, Field(min_length=1, max_length=255)]
TeamId = Annotated[str, Field(pattern=TEAM_ID_PATTERN)]
Day = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$"), AfterValidator(_day)]


# -- request bodies -------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _QuotaFields(_Strict):
    """Limits and budget, as keys and teams both carry them. Absent or null: no limit."""

    rpm: Rate | None = None
    tpm: Rate | None = None
    max_parallel: Rate | None = None
    budget_usd: Dollars | None = None
    budget_period: BudgetPeriod | None = None  # null: month
    soft_budget_ratio: Ratio | None = None


class TeamCreate(_QuotaFields):
    id: TeamId | None = None  # default: a generated team_<hex>
    name: Name | None = None  # default: the id
    organization: Name = ""
    metadata: Metadata = Field(default_factory=dict)


class TeamPatch(_QuotaFields):
    name: Name | None = None
    organization: Name | None = None
    metadata: Metadata | None = None


class KeyCreate(_QuotaFields):
    name: Name = ""
    team_id: str | None = None
    user: Name | None = None
    role: Role = Role.USER
    allowed_models: Annotated[list[ModelPattern], Field(max_length=256)] = Field(
        default_factory=list
    )
    expires_at: UnixSeconds | None = None
    expires_in_s: Seconds | None = None
    metadata: Metadata = Field(default_factory=dict)


class KeyPatch(_QuotaFields):
    name: Name | None = None
    team_id: str | None = None
    user: Name | None = None
    role: Role | None = None
    allowed_models: Annotated[list[ModelPattern], Field(max_length=256)] | None = None
    expires_at: UnixSeconds | None = None
    expires_in_s: Seconds | None = None
    metadata: Metadata | None = None


class UsageQuery(_Strict):
    """``GET /admin/usage`` and ``GET /v1/usage`` query parameters."""

    group_by: Annotated[list[GroupBy], BeforeValidator(_comma_list)] = Field(
        default_factory=_by_day
    )
    since: Day | None = None
    until: Day | None = None
    team_id: str | None = None
    key_id: str | None = None
    model: str | None = None


Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], raw: Any) -> Body:
    """Validate ``raw`` (a decoded JSON body or query mapping) or raise a 400 naming the field."""
    if not isinstance(raw, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc) from None


# -- wire → domain --------------------------------------------------------------------------


def _quota(body: _QuotaFields, base: Quota) -> Quota:
    """``base`` with the quota fields ``body`` sets (null clears) applied."""
    changes: dict[str, Any] = {}
    given = body.model_fields_set
    for name in ("rpm", "tpm", "max_parallel", "soft_budget_ratio"):
        if name in given:
            changes[name] = getattr(body, name)
    if "budget_usd" in given:
        dollars = body.budget_usd
        changes["budget_micro_usd"] = None if dollars is None else int(dollars * MICRO)
    if "budget_period" in given:
        changes["budget_period"] = body.budget_period or BudgetPeriod.MONTH
    quota = dataclasses.replace(base, **changes)
    if quota.soft_budget_ratio is not None and quota.budget_micro_usd is None:
        raise ValidationFailedError(
            "Invalid value for 'soft_budget_ratio': a soft budget is a share of the hard one; "
            "set budget_usd too.",
            param="soft_budget_ratio",
        )
    return quota


def _expiry(
    body: KeyCreate | KeyPatch, current: float | None, now: float, *, allow_past: bool
) -> float | None:
    given = body.model_fields_set
    if "expires_at" in given and "expires_in_s" in given:
        raise ValidationFailedError(
            "Invalid value for 'expires_in_s': send expires_at or expires_in_s, not both.",
            param="expires_in_s",
        )
    if "expires_in_s" in given:
        return None if body.expires_in_s is None else now + body.expires_in_s
    if "expires_at" not in given:
        return current
    if body.expires_at is not None and body.expires_at <= now and not allow_past:
        raise ValidationFailedError(
            f"Invalid value for 'expires_at': {iso(body.expires_at)} is in the past; "
            "give a future time (ISO 8601 or unix seconds) or expires_in_s.",
            param="expires_at",
        )
    return body.expires_at


def new_team(body: TeamCreate, now: float) -> Team:
    team_id = body.id or f"team_{uuid.uuid4().hex[:16]}"
    return Team(
        id=team_id,
        name=body.name or team_id,
        organization=body.organization,
        quota=_quota(body, NO_QUOTA),
        metadata=dict(body.metadata),
        created_at=now,
    )


def patched_team(team: Team, body: TeamPatch) -> Team:
    given = body.model_fields_set
    return dataclasses.replace(
        team,
        name=(body.name or team.id) if "name" in given else team.name,
        organization=(body.organization or "") if "organization" in given else team.organization,
        metadata=dict(body.metadata or {}) if "metadata" in given else team.metadata,
        quota=_quota(body, team.quota),
    )


def key_fields(body: KeyCreate, now: float) -> dict[str, Any]:
    """The keyword arguments of :func:`headrace.gateway.auth.new_key` that ``body`` sets."""
    return {
        "role": body.role,
        "name": body.name,
        "team_id": body.team_id,
        "user": body.user,
        "allowed_models": frozenset(body.allowed_models),
        "quota": _quota(body, NO_QUOTA),
        "expires_at": _expiry(body, None, now, allow_past=False),
        "metadata": dict(body.metadata),
    }


def patched_key(key: ApiKey, body: KeyPatch, now: float) -> ApiKey:
    """``key`` with what ``body`` changes. An ``expires_at`` in the past expires it at once."""
    given = body.model_fields_set
    changes: dict[str, Any] = {
        "quota": _quota(body, key.quota),
        "expires_at": _expiry(body, key.expires_at, now, allow_past=True),
    }
    for name in ("team_id", "user"):
        if name in given:
            changes[name] = getattr(body, name)
    if "name" in given:
        changes["name"] = body.name or ""
    if "role" in given:
        changes["role"] = body.role or Role.USER
    if "allowed_models" in given:
        changes["allowed_models"] = frozenset(body.allowed_models or ())
    if "metadata" in given:
        changes["metadata"] = dict(body.metadata or {})
    return dataclasses.replace(key, **changes)


# -- domain → wire --------------------------------------------------------------------------


def iso(unix_seconds: float) -> str:
    """UTC, to the second: ``2027-01-31T00:00:00Z``."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dollars(micro_usd: int) -> float:
    """Micro-dollars as a JSON number of dollars (exact: 6 decimals fit a double's digits)."""
    return micro_usd / MICRO


class TeamView(BaseModel):
    object: Literal["team"] = "team"
    id: str
    name: str
    organization: str
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_usd: float | None
    budget_period: BudgetPeriod
    soft_budget_ratio: float | None
    metadata: dict[str, str]
    created_at: str


class KeyView(BaseModel):
    """A key as the admin API shows it. There is no field for the secret or its hash."""

    object: Literal["api_key"] = "api_key"
    id: str
    prefix: str
    name: str
    team_id: str | None
    user: str | None
    role: Role
    allowed_models: list[str]
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_usd: float | None
    budget_period: BudgetPeriod
    soft_budget_ratio: float | None
    expires_at: str | None
    revoked: bool
    created_at: str
    metadata: dict[str, str]


def _quota_fields(quota: Quota) -> dict[str, Any]:
    return {
        "rpm": quota.rpm,
        "tpm": quota.tpm,
        "max_parallel": quota.max_parallel,
        "budget_usd": None if quota.budget_micro_usd is None else dollars(quota.budget_micro_usd),
        "budget_period": quota.budget_period,
        "soft_budget_ratio": quota.soft_budget_ratio,
    }


def team_view(team: Team) -> dict[str, Any]:
    return TeamView(
        id=team.id,
        name=team.name,
        organization=team.organization,
        metadata=dict(team.metadata),
        created_at=iso(team.created_at),
        **_quota_fields(team.quota),
    ).model_dump(mode="json")


def key_view(key: ApiKey) -> dict[str, Any]:
    """The public view of a key: never its secret, never its hash."""
    return KeyView(
        id=key.id,
        prefix=key.prefix,
        name=key.name,
        team_id=key.team_id,
        user=key.user,
        role=key.role,
        allowed_models=sorted(key.allowed_models),
        expires_at=None if key.expires_at is None else iso(key.expires_at),
        revoked=key.revoked,
        created_at=iso(key.created_at),
        metadata=dict(key.metadata),
        **_quota_fields(key.quota),
    ).model_dump(mode="json")


_GROUP_FIELD: dict[GroupBy, str] = {
    "day": "day",
    "key": "key_id",
    "team": "team_id",
    "model": "model",
}


def usage_view(rows: Sequence[UsageRow], group_by: Sequence[GroupBy]) -> dict[str, Any]:
    """Usage rows with money in dollars; each row names only the fields grouped by."""
    data = []
    for row in rows:
        item: dict[str, Any] = {_GROUP_FIELD[g]: getattr(row, _GROUP_FIELD[g]) for g in group_by}
        item.update(
            requests=row.requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_tokens=row.cached_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
            cost_usd=dollars(row.cost_micro_usd),
            baseline_cost_usd=dollars(row.baseline_cost_micro_usd),
            routing_saved_usd=dollars(row.baseline_cost_micro_usd - row.cost_micro_usd),
            cache_hits=row.cache_hits,
            errors=row.errors,
        )
        data.append(item)
    return {"object": "list", "group_by": list(group_by), "data": data}
