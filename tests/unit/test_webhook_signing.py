"""Standard Webhooks signing: the reference vector, round trips, tampering, replay windows,
rotation, and the reference Python library as an independent verifier."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest

from headrace.events.signing import WebhookVerificationError, new_secret, sign, verify

# The test vector the Standard Webhooks reference libraries share (their webhook tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_700_000_000
BODY = b'{"id":"evt_1","type":"job.completed","data":{"job_id":"job_1"}}'


def test_reference_vector_signs_to_the_published_signature() -> None:
    headers = sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    assert headers == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }


def test_reference_vector_verifies() -> None:
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TS)


def test_new_secret_has_the_format_and_round_trips() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert new_secret() != secret
    verify(secret, sign(secret, "evt_1", NOW, BODY), BODY, now=NOW)


@pytest.mark.parametrize("nbytes", [16, 23, 65])
def test_new_secret_refuses_sizes_outside_the_spec(nbytes: int) -> None:
    with pytest.raises(ValueError, match="24 to 64"):
        new_secret(nbytes)


def test_headers_match_case_insensitively() -> None:
    secret = new_secret()
    headers = {k.upper(): v for k, v in sign(secret, "evt_1", NOW, BODY).items()}
    verify(secret, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [("body", BODY + b" "), ("webhook-id", "evt_2"), ("webhook-timestamp", str(NOW + 1))],
)
def test_tampering_with_body_id_or_timestamp_fails(field: str, value: object) -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW, BODY)
    body = BODY
    if field == "body":
        assert isinstance(value, bytes)
        body = value
    else:
        assert isinstance(value, str)
        headers[field] = value
    with pytest.raises(WebhookVerificationError, match="No webhook signature matches"):
        verify(secret, headers, body, now=NOW)


def test_wrong_secret_fails() -> None:
    headers = sign(new_secret(), "evt_1", NOW, BODY)
    with pytest.raises(WebhookVerificationError, match="different secret"):
        verify(new_secret(), headers, BODY, now=NOW)


def test_stale_timestamp_fails_even_with_a_valid_signature() -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW - 301, BODY)
    with pytest.raises(WebhookVerificationError, match=r"301 s old, past the 300 s tolerance"):
        verify(secret, headers, BODY, now=NOW)
    verify(secret, headers, BODY, now=NOW, tolerance_s=600)


def test_future_timestamp_fails() -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW + 400, BODY)
    with pytest.raises(WebhookVerificationError, match="in the future"):
        verify(secret, headers, BODY, now=NOW)


def test_timestamp_at_the_edge_of_the_tolerance_passes() -> None:
    secret = new_secret()
    verify(secret, sign(secret, "evt_1", NOW - 300, BODY), BODY, now=NOW)
    verify(secret, sign(secret, "evt_1", NOW + 300, BODY), BODY, now=NOW)


def test_now_defaults_to_the_clock() -> None:
    secret = new_secret()
    verify(secret, sign(secret, "evt_1", int(time.time()), BODY), BODY)
    with pytest.raises(WebhookVerificationError, match="old"):
        verify(secret, sign(secret, "evt_1", VECTOR_TS, BODY), BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_named(missing: str) -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW, BODY)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"Missing webhook header.*{missing}"):
        verify(secret, headers, BODY, now=NOW)


def test_malformed_timestamp_fails() -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW, BODY) | {"webhook-timestamp": "1.7e9"}
    with pytest.raises(WebhookVerificationError, match="integer Unix seconds"):
        verify(secret, headers, BODY, now=NOW)


def test_header_without_a_v1_signature_fails() -> None:
    secret = new_secret()
    headers = sign(secret, "evt_1", NOW, BODY) | {"webhook-signature": "v1a,AAAA garbage"}
    with pytest.raises(WebhookVerificationError, match="no 'v1,<base64>' signature"):
        verify(secret, headers, BODY, now=NOW)


def test_rotation_signs_with_each_secret_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = sign([old, new], "evt_1", NOW, BODY)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    assert all(entry.startswith("v1,") for entry in entries)
    verify(old, headers, BODY, now=NOW)
    verify(new, headers, BODY, now=NOW)
    # A receiver holding both secrets during its own rotation accepts a single signature too.
    verify([old, new], sign(new, "evt_1", NOW, BODY), BODY, now=NOW)
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), headers, BODY, now=NOW)


def test_unknown_schemes_and_junk_entries_are_skipped() -> None:
    secret = new_secret()
    valid = sign(secret, "evt_1", NOW, BODY)["webhook-signature"]
    header = f"v1a,c29tZXRoaW5n junk v1,bm90LWl0 {valid}"
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(NOW), "webhook-signature": header}
    verify(secret, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with 'whsec_'"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "at least 24"),
    ],
)
def test_malformed_secrets_are_refused_without_echoing_them(secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        sign(secret, "evt_1", NOW, BODY)
    assert secret.removeprefix("whsec_") not in str(caught.value)


def test_unpadded_secret_is_accepted() -> None:
    padded = "whsec_" + base64.b64encode(bytes(range(25))).decode()
    assert padded.endswith("=")
    unpadded = padded.rstrip("=")
    assert sign(unpadded, "evt_1", NOW, BODY) == sign(padded, "evt_1", NOW, BODY)


@pytest.mark.parametrize("msg_id", ["", "evt.1"])
def test_ids_with_dots_are_refused(msg_id: str) -> None:
    with pytest.raises(ValueError, match=r"contain no '\.'"):
        sign(new_secret(), msg_id, NOW, BODY)


def test_the_reference_library_verifies_our_signatures() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    old, new = new_secret(), new_secret()
    headers = sign([old, new], "evt_1", int(time.time()), BODY)
    assert standardwebhooks.Webhook(new).verify(BODY, headers) == {
        "id": "evt_1",
        "type": "job.completed",
        "data": {"job_id": "job_1"},
    }
    assert standardwebhooks.Webhook(old).verify(BODY, headers)["id"] == "evt_1"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(BODY, headers)


def test_we_verify_the_reference_librarys_signatures() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = new_secret()
    now = int(time.time())
    signature = standardwebhooks.Webhook(secret).sign(
        "evt_1", datetime.fromtimestamp(now, tz=UTC), BODY.decode()
    )
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": signature}
    verify(secret, headers, BODY, now=now)
