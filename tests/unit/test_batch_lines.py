"""The JSONL lines of a batch's files, without a gateway: every kind of bad input line, and the
output and error lines a finished job becomes."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from headrace.domain import Job, JobKind, JobStatus
from headrace.jobs import batch_lines
from headrace.jobs.batch_lines import (
    batch_usage,
    error_line,
    expired,
    line_number,
    output_line,
    read_lines,
)

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def request(custom_id: object = "a", **fields: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": BODY, **fields}


def jsonl(*rows: object) -> bytes:
    return b"".join((row if isinstance(row, bytes) else orjson.dumps(row)) + b"\n" for row in rows)


def test_good_lines_keep_their_numbers_counting_blank_lines() -> None:
    lines, errors = read_lines(jsonl(request("a"), b"", b"  ", request("b")), CHAT)
    assert errors == []
    assert [(line.number, line.custom_id, line.body) for line in lines] == [
        (1, "a", BODY),
        (4, "b", BODY),
    ]


@pytest.mark.parametrize(
    ("row", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (b"[1, 2]", "invalid_json_line", None),
        (request(custom_id=None), "missing_required_parameter", "custom_id"),
        (request(custom_id=""), "missing_required_parameter", "custom_id"),
        (request(custom_id=7), "missing_required_parameter", "custom_id"),
        (request(custom_id="x" * 513), "invalid_value", "custom_id"),
        (request(method="GET"), "invalid_method", "method"),
        (request(url="/v1/embeddings"), "mismatched_endpoint", "url"),
        (request(body="hi"), "missing_required_parameter", "body"),
    ],
)
def test_a_bad_line_is_reported_with_its_code_param_and_number(
    row: object, code: str, param: str | None
) -> None:
    lines, errors = read_lines(jsonl(request("first"), row), CHAT)
    assert [line.custom_id for line in lines] == ["first"]
    assert len(errors) == 1
    assert errors[0]["code"] == code
    assert errors[0]["param"] == param
    assert errors[0]["line"] == 2
    assert errors[0]["message"]


def test_a_custom_id_used_twice_names_the_line_that_has_it() -> None:
    _, errors = read_lines(jsonl(request("same"), request("other"), request("same")), CHAT)
    assert [(e["code"], e["line"]) for e in errors] == [("duplicate_custom_id", 3)]
    assert "line 1" in errors[0]["message"]


def test_every_bad_line_is_reported_not_only_the_first() -> None:
    content = jsonl(b"nope", request("ok"), request(method="PUT"), b"[]")
    lines, errors = read_lines(content, CHAT)
    assert [line.number for line in lines] == [2]
    assert [e["line"] for e in errors] == [1, 3, 4]


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte() -> None:
    content = jsonl(request("a"), request("b")) + b'{"custom_id": "\xff"}\n'
    assert read_lines(content, CHAT) == (
        [],
        [
            {
                "code": "invalid_file_encoding",
                "message": "The file is not UTF-8.",
                "param": None,
                "line": 3,
            }
        ],
    )


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_a_file_without_requests_is_an_error(content: bytes) -> None:
    assert [e["code"] for e in read_lines(content, CHAT)[1]] == ["empty_file"]


def test_too_many_lines_stop_reading_at_the_first_one_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_lines, "MAX_REQUESTS", 2)
    lines, errors = read_lines(jsonl(*(request(f"r{i}") for i in range(5))), CHAT)
    assert len(lines) == 2
    assert [(e["code"], e["line"]) for e in errors] == [("too_many_requests", 3)]


JOB = Job(
    id="job_0123abcd",
    kind=JobKind.CHAT,
    body=BODY,
    key_id="key_1",
    status=JobStatus.SUCCEEDED,
    attempts=2,
    result={"id": "chatcmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    metadata={"custom_id": "req-7", "batch_line": "7"},
)


def test_a_succeeded_job_becomes_an_output_line() -> None:
    assert line_number(JOB) == 7
    assert output_line(JOB) == {
        "id": "batch_req_0123abcd",
        "custom_id": "req-7",
        "response": {"status_code": 200, "request_id": "job_0123abcd-2", "body": JOB.result},
        "error": None,
    }


def test_a_job_that_answered_with_an_error_carries_the_answer() -> None:
    failed = dataclasses.replace(
        JOB,
        status=JobStatus.FAILED,
        result=None,
        error={"status": 400, "message": "bad", "type": "invalid_request_error", "code": "x"},
    )
    line = error_line(failed, cancelling=False)
    assert line["error"] is None
    assert line["response"] == {
        "status_code": 400,
        "request_id": "job_0123abcd-2",
        "body": {
            "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": "x"}
        },
    }


@pytest.mark.parametrize(
    ("status", "error", "cancelling", "code"),
    [
        (JobStatus.CANCELLED, None, True, "batch_cancelled"),
        (JobStatus.CANCELLED, None, False, "request_cancelled"),
        (JobStatus.FAILED, {"code": "expired", "message": "late"}, False, "batch_expired"),
        (JobStatus.FAILED, {"code": "upstream_down", "message": "gone"}, False, "upstream_down"),
        (JobStatus.DEAD, None, False, "request_failed"),
    ],
)
def test_a_job_that_did_not_answer_carries_an_error(
    status: JobStatus, error: dict[str, Any] | None, cancelling: bool, code: str
) -> None:
    ended = dataclasses.replace(JOB, status=status, result=None, error=error)
    line = error_line(ended, cancelling=cancelling)
    assert line["id"] == "batch_req_0123abcd"
    assert line["custom_id"] == "req-7"
    assert line["response"] is None
    assert line["error"]["code"] == code
    assert line["error"]["message"]
    assert expired(ended) is (code == "batch_expired")


def test_batch_usage_adds_the_tokens_and_ignores_what_is_not_a_count() -> None:
    results = [
        {
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2},
            }
        },
        {"usage": {"prompt_tokens": 1, "completion_tokens": "many"}},
        {"usage": None},
        {},
    ]
    assert batch_usage(results) == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 16,
    }
