"""The JSONL lines of a batch's files: reading the input, writing the output and error files.

Pure functions, no I/O: :class:`~headrace.jobs.batches.BatchService` reads a stored input
file's bytes with :func:`read_lines` (every bad line reported at once, in OpenAI's batch
error shape, built by :func:`batch_error`) and, when the batch ends, writes one
:func:`output_line` per request that succeeded and one :func:`error_line` per other, in
OpenAI's batch output format, with :func:`batch_usage` for the batch's ``usage``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from headrace.domain import Job, JobStatus

__all__ = [
    "MAX_CUSTOM_ID_CHARS",
    "MAX_REQUESTS",
    "Line",
    "batch_error",
    "batch_usage",
    "error_line",
    "expired",
    "line_number",
    "output_line",
    "read_lines",
]

MAX_REQUESTS = 50_000  # lines per input file, as OpenAI
MAX_CUSTOM_ID_CHARS = 512  # a job metadata value


@dataclass(frozen=True, slots=True)
class Line:
    """One request of an input file."""

    number: int  # 1-based, as an editor shows it
    custom_id: str
    body: Mapping[str, Any]


# -- the input file ---------------------------------------------------------------------------


def read_lines(content: bytes, endpoint: str) -> tuple[list[Line], list[dict[str, Any]]]:
    """The file's requests and the errors of its bad lines (OpenAI's batch error codes).

    Blank lines are skipped; line numbers count every line. Each line must be a JSON object
    ``{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}``
    with a ``custom_id`` unique in the file.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        return [], [batch_error("invalid_file_encoding", "The file is not UTF-8.", line)]
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= MAX_REQUESTS:
            errors.append(
                batch_error(
                    "too_many_requests",
                    f"A batch holds at most {MAX_REQUESTS} requests; split the file.",
                    number,
                )
            )
            break
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(batch_error("invalid_json_line", "This line is not valid JSON.", number))
            continue
        problem = _line_problem(request, endpoint, seen)
        if problem is not None:
            errors.append({**problem, "line": number})
            continue
        seen[request["custom_id"]] = number
        lines.append(Line(number, request["custom_id"], request["body"]))
    if not lines and not errors:
        errors.append(batch_error("empty_file", "The file has no requests."))
    return lines, errors


def _line_problem(request: Any, endpoint: str, seen: Mapping[str, int]) -> dict[str, Any] | None:
    """What is wrong with one parsed line, as an OpenAI batch error (without its line)."""
    if not isinstance(request, dict):
        return batch_error("invalid_json_line", "Each line must be a JSON object.")
    return _custom_id_problem(request.get("custom_id"), seen) or _call_problem(request, endpoint)


def _custom_id_problem(custom_id: object, seen: Mapping[str, int]) -> dict[str, Any] | None:
    if not isinstance(custom_id, str) or not custom_id:
        return batch_error(
            "missing_required_parameter", "custom_id must be a non-empty string.", param="custom_id"
        )
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return batch_error(
            "invalid_value",
            f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
            param="custom_id",
        )
    if custom_id in seen:
        return batch_error(
            "duplicate_custom_id",
            f"custom_id {custom_id!r} is already used on line {seen[custom_id]}; "
            "each request needs its own.",
            param="custom_id",
        )
    return None


def _call_problem(request: Mapping[str, Any], endpoint: str) -> dict[str, Any] | None:
    if request.get("method") != "POST":
        return batch_error("invalid_method", "method must be POST.", param="method")
    if request.get("url") != endpoint:
        return batch_error(
            "mismatched_endpoint",
            f"url is {request.get('url')!r}, but this batch's endpoint is {endpoint!r}; every "
            "line must call the batch's endpoint.",
            param="url",
        )
    if not isinstance(request.get("body"), dict):
        return batch_error(
            "missing_required_parameter", "body must be a JSON object.", param="body"
        )
    return None


def batch_error(
    code: str, message: str, line: int | None = None, param: str | None = None
) -> dict[str, Any]:
    """One entry of OpenAI's batch ``errors`` list; ``line`` is None for the file as a whole."""
    return {"code": code, "message": message, "param": param, "line": line}


# -- the output files (OpenAI's batch output format) ------------------------------------------


def line_number(job: Job) -> int:
    return int(job.metadata.get("batch_line", "0"))


def _request_ids(job: Job) -> tuple[str, str]:
    """The line's ``id`` (``batch_req_<hex>``, from the job's) and the request id the runner
    gave the job's last attempt (as in the gateway's logs)."""
    return f"batch_req_{job.id.removeprefix('job_')}", f"{job.id}-{job.attempts}"


def output_line(job: Job) -> dict[str, Any]:
    line_id, request_id = _request_ids(job)
    return {
        "id": line_id,
        "custom_id": job.metadata.get("custom_id"),
        "response": {
            "status_code": 200,
            "request_id": request_id,
            "body": dict(job.result or {}),
        },
        "error": None,
    }


def expired(job: Job) -> bool:
    return job.status is JobStatus.FAILED and (job.error or {}).get("code") == "expired"


def error_line(job: Job, *, cancelling: bool) -> dict[str, Any]:
    """A request that answered with an error carries that answer (``response``, its status
    code and OpenAI error body); one that never ran carries ``error`` instead."""
    line_id, request_id = _request_ids(job)
    line: dict[str, Any] = {"id": line_id, "custom_id": job.metadata.get("custom_id")}
    failure = dict(job.error or {})
    if job.status is JobStatus.CANCELLED:
        if cancelling:
            error = _line_error("batch_cancelled", "The batch was cancelled before this ran.")
        else:
            error = _line_error("request_cancelled", f"Job {job.id} was cancelled.")
        return {**line, "response": None, "error": error}
    if expired(job):
        error = _line_error(
            "batch_expired",
            "This request had not started when the batch's completion window ended.",
        )
        return {**line, "response": None, "error": error}
    if isinstance(failure.get("status"), int):
        error_body = {name: failure.get(name) for name in ("message", "type", "param", "code")}
        response = {
            "status_code": failure["status"],
            "request_id": request_id,
            "body": {"error": error_body},
        }
        return {**line, "response": response, "error": None}
    error = _line_error(
        str(failure.get("code") or "request_failed"),
        str(failure.get("message") or f"Job {job.id} ended {job.status.value}."),
    )
    return {**line, "response": None, "error": error}


def _line_error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def batch_usage(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's batch ``usage``: the tokens of the requests that succeeded."""
    prompt = completion = cached = reasoning = 0
    for result in results:
        usage = _mapping(result.get("usage"))
        prompt += _count(usage, "prompt_tokens")
        completion += _count(usage, "completion_tokens")
        cached += _count(_mapping(usage.get("prompt_tokens_details")), "cached_tokens")
        reasoning += _count(_mapping(usage.get("completion_tokens_details")), "reasoning_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) else 0
