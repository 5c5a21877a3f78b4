"""Commands that drive a running gateway's admin API: cache, keys, teams, usage, feedback."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer

from headrace.cli._common import (
    AdminKeyOption,
    ConfigOption,
    UrlOption,
    admin_call,
    admin_key_of,
    app,
)

cache_app = typer.Typer(help="Inspect and purge a running gateway's response cache.")
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats(
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Entries, bytes, evictions and hit/miss/bypass counts."""
    stats = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/cache", {})
    assert isinstance(stats, dict)
    for name in ("entries", "bytes", "evictions"):
        typer.echo(f"{name:<10} {stats[name]}")
    for result, count in sorted(stats["requests"].items()):
        typer.echo(f"{result:<10} {count}")


@cache_app.command("purge")
def cache_purge(
    model: Annotated[str | None, typer.Option(help="Only this model's entries.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team's entries.")] = None,
    key: Annotated[str | None, typer.Option(help="Only entries made with this key id.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Purge every entry.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete cached responses by model, team or key (or --all)."""
    query = {k: v for k, v in (("model", model), ("team", team), ("key", key)) if v}
    if not query and not everything:
        typer.echo("Say what to purge: --model, --team, --key, or --all.", err=True)
        raise typer.Exit(2)
    result = admin_call(url, admin_key_of(admin_key, config), "DELETE", "/admin/cache", query)
    assert isinstance(result, dict)
    typer.echo(f"purged {result['purged']} entries")


# -- teams, keys and usage (the /admin API) --------------------------------------------------

keys_app = typer.Typer(help="Issue, list, show and revoke virtual API keys.", no_args_is_help=True)
teams_app = typer.Typer(help="Create, list and show teams (tenants).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(teams_app, name="teams")

RpmOption = Annotated[int | None, typer.Option(help="Requests per minute.")]
TpmOption = Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute.")]
ParallelOption = Annotated[int | None, typer.Option(help="Requests in flight at once.")]
BudgetOption = Annotated[
    str | None, typer.Option(help="Hard budget per period in dollars, e.g. 25.50 (6 decimals max).")
]
PeriodOption = Annotated[
    str | None,
    typer.Option(help="When the budget starts again: day, week, month (default), total."),
]
SoftRatioOption = Annotated[
    float | None, typer.Option(help="Alert when spend crosses this share of the budget (0-1].")
]
MetadataOption = Annotated[
    list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE; repeat for more.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def _limits(
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
    budget_usd: str | None,
    budget_period: str | None,
    soft_budget_ratio: float | None,
    metadata: list[str] | None,
) -> dict[str, object]:
    """The limit, budget and metadata fields of a request body that the options set."""
    body: dict[str, object] = {
        name: value
        for name, value in (
            ("rpm", rpm),
            ("tpm", tpm),
            ("max_parallel", max_parallel),
            ("budget_usd", budget_usd),  # a string: the gateway reads it as an exact decimal
            ("budget_period", budget_period),
            ("soft_budget_ratio", soft_budget_ratio),
        )
        if value is not None
    }
    if metadata:
        pairs = [item.partition("=") for item in metadata]
        if any(not sep or not name for name, sep, _ in pairs):
            typer.echo("--metadata takes KEY=VALUE, e.g. --metadata tier=gold", err=True)
            raise typer.Exit(2)
        body["metadata"] = {name: value for name, _, value in pairs}
    return body


def _show(view: object, as_json: bool) -> None:
    """One team or key: its JSON, or one ``field  value`` line per field."""
    assert isinstance(view, dict)
    if as_json:
        typer.echo(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
        return
    for name, value in view.items():
        if name != "object":
            typer.echo(f"{name:<18} {_cell(value)}")


def _quoted(segment: str) -> str:
    """An id as one URL path segment, whatever it holds."""
    import urllib.parse

    return urllib.parse.quote(segment, safe="")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    for line in [columns, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        typer.echo("  ".join(cells).rstrip())


def _listing(answer: object, columns: list[str], as_json: bool) -> None:
    assert isinstance(answer, dict)
    if as_json:
        typer.echo(orjson.dumps(answer["data"], option=orjson.OPT_INDENT_2).decode())
        return
    _table(columns, [[_cell(item[c]) for c in columns] for item in answer["data"]])


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    team: Annotated[str | None, typer.Option(help="The team (id) the key belongs to.")] = None,
    user: Annotated[str | None, typer.Option(help="Who the key is for, e.g. an email.")] = None,
    role: Annotated[str, typer.Option(help="user, or admin for the /admin API.")] = "user",
    allow_model: Annotated[
        list[str] | None,
        typer.Option(help="A model name or fnmatch pattern (echo*); repeat. Default: all."),
    ] = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_parallel: ParallelOption = None,
    budget_usd: BudgetOption = None,
    budget_period: PeriodOption = None,
    soft_budget_ratio: SoftRatioOption = None,
    expires_at: Annotated[
        str | None, typer.Option(help="ISO 8601 (2027-01-31T00:00:00Z; UTC if no zone) or unix s.")
    ] = None,
    expires_in_s: Annotated[float | None, typer.Option(help="Expire this many s from now.")] = None,
    metadata: MetadataOption = None,
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Issue a key. Its secret is printed once: store it, Headrace keeps only a hash."""
    optional: dict[str, object] = {
        "team_id": team,
        "user": user,
        "allowed_models": allow_model or None,
        "expires_at": expires_at,
        "expires_in_s": expires_in_s,
    }
    body: dict[str, object] = {"name": name, "role": role}
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update(
        _limits(rpm, tpm, max_parallel, budget_usd, budget_period, soft_budget_ratio, metadata)
    )
    created = admin_call(url, admin_key_of(admin_key, config), "POST", "/admin/keys", {}, body)
    assert isinstance(created, dict)
    if as_json:
        _show(created, as_json=True)
    else:
        _show({k: v for k, v in created.items() if k != "key"}, as_json=False)
    typer.echo(
        "\nStore this secret now: Headrace keeps only its hash and will not show it again.",
        err=True,
    )
    if not as_json:
        typer.echo(created["key"])


@keys_app.command("list")
def keys_list(
    team: Annotated[str | None, typer.Option(help="Only this team's keys.")] = None,
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Every key (never a secret), oldest first."""
    query = {"team_id": team} if team else {}
    answer = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/keys", query)
    columns = ["id", "name", "team_id", "user", "role", "prefix", "expires_at", "revoked"]
    _listing(answer, columns, as_json)


@keys_app.command("show")
def keys_show(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), not its secret.")],
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """A key's team, limits, budget, expiry and metadata."""
    key = admin_call(
        url, admin_key_of(admin_key, config), "GET", f"/admin/keys/{_quoted(key_id)}", {}
    )
    _show(key, as_json)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")],
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke a key for good: refused at once here, within auth.key_cache_ttl_s elsewhere."""
    path = f"/admin/keys/{_quoted(key_id)}/revoke"
    admin_call(url, admin_key_of(admin_key, config), "POST", path, {})
    typer.echo(f"revoked {key_id}")


@teams_app.command("create")
def teams_create(
    team_id: Annotated[
        str | None, typer.Option("--id", help="a-z, 0-9, _ and -; default: team_<hex>.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name; default: the id.")] = None,
    organization: Annotated[str, typer.Option(help="Free text.")] = "",
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_parallel: ParallelOption = None,
    budget_usd: BudgetOption = None,
    budget_period: PeriodOption = None,
    soft_budget_ratio: SoftRatioOption = None,
    metadata: MetadataOption = None,
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a team; its limits and budget apply on top of its keys' own."""
    body: dict[str, object] = {"organization": organization}
    body.update({k: v for k, v in (("id", team_id), ("name", name)) if v is not None})
    body.update(
        _limits(rpm, tpm, max_parallel, budget_usd, budget_period, soft_budget_ratio, metadata)
    )
    team = admin_call(url, admin_key_of(admin_key, config), "POST", "/admin/teams", {}, body)
    _show(team, as_json)


@teams_app.command("list")
def teams_list(
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Every team, oldest first."""
    answer = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/teams", {})
    columns = ["id", "name", "organization", "rpm", "tpm", "budget_usd", "budget_period"]
    _listing(answer, columns, as_json)


@teams_app.command("show")
def teams_show(
    team_id: Annotated[str, typer.Argument(help="The team's id.")],
    as_json: JsonOption = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """A team's limits, budget and metadata."""
    team = admin_call(
        url, admin_key_of(admin_key, config), "GET", f"/admin/teams/{_quoted(team_id)}", {}
    )
    _show(team, as_json)


_GROUP_COLUMNS = {"day": "day", "key": "key_id", "team": "team_id", "model": "model"}
_USAGE_METRICS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "cost_usd",
    "baseline_cost_usd",
    "routing_saved_usd",
    "cache_hits",
    "errors",
)
_USAGE_TABLE = {  # the terminal table's metric columns and their headings
    "requests": "requests",
    "prompt_tokens": "prompt_tok",
    "completion_tokens": "compl_tok",
    "cache_hits": "cache_hits",
    "errors": "errors",
    "cost_usd": "cost_usd",
    "routing_saved_usd": "saved_usd",
}


@app.command()
def usage(
    group_by: Annotated[str, typer.Option(help="Comma-separated: day, key, team, model.")] = "day",
    since: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD (UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD (UTC).")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with every column.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Requests, tokens, cost and routing savings, summed per day, key, team and/or model."""
    if as_csv and as_json:
        typer.echo("Choose one of --csv and --json.", err=True)
        raise typer.Exit(2)
    filters = (("group_by", group_by), ("since", since), ("until", until), ("team_id", team))
    query = {k: v for k, v in (*filters, ("key_id", key), ("model", model)) if v}
    answer = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/usage", query)
    assert isinstance(answer, dict)
    if as_json:
        typer.echo(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return
    rows: list[dict[str, object]] = answer["data"]
    grouped = [_GROUP_COLUMNS[g] for g in answer["group_by"]]
    if as_csv:
        import csv

        columns = [*grouped, *_USAGE_METRICS]
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r[c] is None else r[c] for c in columns] for r in rows])
    elif not rows:
        typer.echo("no usage recorded for that selection", err=True)
    else:
        columns = [*grouped, *_USAGE_TABLE]
        cells = [
            [f"{r[c]:.6f}" if c.endswith("_usd") else _cell(r[c]) for c in columns] for r in rows
        ]
        _table([*grouped, *_USAGE_TABLE.values()], cells)


_FEEDBACK_COLUMNS = ["created_at", "team_id", "key_id", "request_id", "score", "label", "comment"]


@app.command()
def feedback(
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    key: Annotated[str | None, typer.Option(help="Only feedback this key id gave.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Only on this request.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    config: ConfigOption = None,
) -> None:
    """Feedback on answers (POST /v1/feedback), newest first, every team's."""
    filters = (("team_id", team), ("key_id", key), ("request_id", request_id))
    query = {k: v for k, v in filters if v} | {"limit": str(limit)}
    answer = admin_call(url, admin_key_of(admin_key, config), "GET", "/admin/feedback", query)
    assert isinstance(answer, dict)
    if as_json:
        typer.echo(orjson.dumps(answer["data"], option=orjson.OPT_INDENT_2).decode())
        return
    rows: list[dict[str, Any]] = answer["data"]
    if not rows:
        typer.echo("no feedback for that selection", err=True)
        return
    cells = [
        [
            datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
            *(_cell(row[c]) for c in _FEEDBACK_COLUMNS[1:]),
        ]
        for row in rows
    ]
    _table(_FEEDBACK_COLUMNS, cells)
