"""The Redis value and announcement formats (pure: no Redis)."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_shared_token._redis.codec import (
    MAX_LIFETIME,
    MAX_TOKEN_CHARS,
    RELEASED,
    Announcement,
    CorruptValueError,
    StoredToken,
    announce_failure,
    decode,
    decode_announcement,
    digest,
    encode,
)
from tests.strategies import json_values

TOKEN = "AbC.dEf-123_xyz~+/="


def raw_value(payload: object, *, fence: int | str = 7, token_digest: str | None = None) -> bytes:
    """A value in the stored layout with a payload of our choosing (digest of TOKEN by default)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{fence}:{token_digest or digest(TOKEN)}:{text}".encode()


def payload(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {"access_token": TOKEN, "token_type": "Bearer", "lifetime": 3600}
    data.update(overrides)
    return data


def with_raw_lifetime(literal: str) -> bytes:
    """A value whose payload has ``lifetime`` spelled as raw JSON text (NaN, huge integers)."""
    return raw_value(json.dumps(payload(lifetime="@")).replace('"@"', literal))


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field() -> None:
    raw = encode(TOKEN, "Bearer", 3600.0, 42)
    assert isinstance(raw, bytes)
    assert decode(raw) == StoredToken(TOKEN, "Bearer", 3600.0, 42)


def test_encoded_layout_is_fence_digest_payload() -> None:
    raw = encode(TOKEN, "Bearer", 60, 3, issued_at=1_700_000_000.5, took_ms=120)
    fence, token_digest, body = raw.split(b":", 2)
    assert fence == b"3"
    assert token_digest == digest(TOKEN).encode()
    assert len(token_digest) == 32
    assert json.loads(body) == {
        "access_token": TOKEN,
        "token_type": "Bearer",
        "lifetime": 60,
        "issued_at": 1_700_000_000.5,
        "took_ms": 120,
    }
    stored = decode(raw)
    assert (stored.issued_at, stored.took_ms) == (1_700_000_000.5, 120)


@pytest.mark.parametrize("odd", ['"yesterday"', "-5", "true", "1e300", "null"])
def test_odd_provenance_fields_read_as_zero_not_corrupt(odd: str) -> None:
    payload = f'{{"access_token":"{TOKEN}","token_type":"Bearer","lifetime":60,"issued_at":{odd}}}'
    stored = decode(f"1:{digest(TOKEN)}:{payload}".encode())
    assert stored.issued_at == 0.0


@pytest.mark.parametrize("fence", [0, 1, 10**18, 10**19 - 1])
def test_round_trip_fence_range(fence: int) -> None:
    assert decode(encode(TOKEN, "Bearer", 1, fence)).fence == fence


def test_round_trip_non_ascii_and_maximum_length_token() -> None:
    for token in ("t\u00f6k\u00e9n", "x" * MAX_TOKEN_CHARS, "a:b:c"):
        assert decode(encode(token, "Bearer", 10, 1)).value == token


def test_lowercase_bearer_is_accepted_as_stored() -> None:
    assert decode(encode(TOKEN, "bearer", 10, 1)).token_type == "bearer"


def test_integer_lifetime_decodes_as_float() -> None:
    stored = decode(raw_value(payload(lifetime=60)))
    assert stored.lifetime == 60.0
    assert isinstance(stored.lifetime, float)


def test_digest_is_stable_128_bit_hex() -> None:
    assert digest(TOKEN) == digest(TOKEN)
    assert digest(TOKEN) != digest(TOKEN + "x")
    assert len(digest(TOKEN)) == 32
    assert set(digest(TOKEN)) <= set(string.hexdigits.lower())


# -- rejected values -------------------------------------------------------------------------


def test_digest_mismatch_is_corrupt() -> None:
    raw = raw_value(payload(access_token="another-token"))
    with pytest.raises(CorruptValueError, match="digest"):
        decode(raw)


def test_tampered_token_inside_an_encoded_value_is_corrupt() -> None:
    raw = encode(TOKEN, "Bearer", 3600, 1).replace(b"AbC", b"XbC")
    with pytest.raises(CorruptValueError, match="digest"):
        decode(raw)


@pytest.mark.parametrize("token_type", ["mac", "", "Bearer ", "Basic", None, 1, ["Bearer"]])
def test_wrong_token_type_is_corrupt(token_type: object) -> None:
    with pytest.raises(CorruptValueError, match="token_type"):
        decode(raw_value(payload(token_type=token_type)))


@pytest.mark.parametrize("lifetime", [0, -1, -0.5, True, False, None, "3600", [3600]])
def test_missing_or_non_positive_lifetime_is_corrupt(lifetime: object) -> None:
    with pytest.raises(CorruptValueError, match="lifetime"):
        decode(raw_value(payload(lifetime=lifetime)))


@pytest.mark.parametrize("token", ["", None, 5, ["x"], "x" * (MAX_TOKEN_CHARS + 1)])
def test_missing_empty_or_oversized_access_token_is_corrupt(token: object) -> None:
    with pytest.raises(CorruptValueError, match="access_token"):
        decode(raw_value(payload(access_token=token)))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"!wrongtype",
        b"hello world",
        b"7",
        b"7:",
        b"7:" + digest(TOKEN).encode(),
        b"7:" + digest(TOKEN).encode() + b":",
        b"-7:" + digest(TOKEN).encode() + b":{}",
        b"1" * 20 + b":" + digest(TOKEN).encode() + b":{}",  # fence of 20 digits
        b"x:" + digest(TOKEN).encode() + b":{}",
        b"7:" + digest(TOKEN).upper().encode() + b":{}",  # digest must be lower-case hex
        b"7:" + digest(TOKEN)[:31].encode() + b":{}",
        raw_value(payload(), fence="\u0667"),  # a non-ASCII digit is not a fence
        raw_value("x" * 16385),  # payload over the 16 KiB bound
        b"\xff\xfe" * 100,
        b"\x00" * 64,
    ],
)
def test_garbage_or_foreign_value_is_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptValueError):
        decode(raw)


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", '"string"', "null", "3600", "{", '{"access_token":'], ids=str
)
def test_payload_that_is_not_a_json_object_is_corrupt(text: str) -> None:
    with pytest.raises(CorruptValueError, match="payload"):
        decode(raw_value(text))


def test_payload_that_is_not_utf8_is_corrupt() -> None:
    raw = b"7:" + digest(TOKEN).encode() + b':{"access_token":"\xff\xfe"}'
    with pytest.raises(CorruptValueError):
        decode(raw)


def test_huge_value_is_corrupt() -> None:
    raw = encode("t" * 20_000, "Bearer", 3600, 1)
    with pytest.raises(CorruptValueError):
        decode(raw)
    with pytest.raises(CorruptValueError):
        decode(b"9" * 1_000_000)


def test_corrupt_value_error_is_a_value_error() -> None:
    assert issubclass(CorruptValueError, ValueError)


def test_deeply_nested_payload_is_corrupt() -> None:
    with pytest.raises(CorruptValueError):
        decode(raw_value("[" * 16000))


def test_lifetime_beyond_float_range_is_corrupt() -> None:
    with pytest.raises(CorruptValueError):
        decode(with_raw_lifetime("1" + "0" * 400))


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_lifetime_is_corrupt(literal: str) -> None:
    with pytest.raises(CorruptValueError):
        decode(with_raw_lifetime(literal))


# -- announcements ---------------------------------------------------------------------------


def test_token_announcement_decodes_value_and_ttl() -> None:
    value = encode(TOKEN, "Bearer", 3600, 9)
    ann = decode_announcement(b"T3599000:" + value)
    assert ann == Announcement(StoredToken(TOKEN, "Bearer", 3600.0, 9), 3599000, None)


def test_token_announcement_with_zero_ttl() -> None:
    assert decode_announcement(b"T0:" + encode(TOKEN, "Bearer", 1, 1)).ttl_ms == 0


@pytest.mark.parametrize("code", ["invalid_client", "rejected", "unavailable", "timeout"])
def test_failure_announcement_round_trip(code: str) -> None:
    ann = decode_announcement(announce_failure(code).encode())
    assert ann == Announcement(None, 0, code)


def test_failure_announcement_code_is_truncated_and_made_ascii() -> None:
    assert decode_announcement(b"E" + b"x" * 200).error_code == "x" * 64
    code = decode_announcement(b"Einvalid\xffclient").error_code
    assert code is not None
    assert code.startswith("invalid")
    assert code.isprintable()


def test_empty_failure_announcement_has_empty_code() -> None:
    assert decode_announcement(b"E") == Announcement(None, 0, "")


def test_a_lock_given_back_is_its_own_announcement() -> None:
    assert decode_announcement(RELEASED.encode()) == Announcement(None, 0, None, released=True)
    with pytest.raises(CorruptValueError):
        decode_announcement(RELEASED.encode() + b"x")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"!wrongtype",
        b"X123",
        b"t100:" + encode(TOKEN, "Bearer", 1, 1),  # case matters
        b"T",
        b"T100",
        b"T:" + encode(TOKEN, "Bearer", 1, 1),
        b"T-5:" + encode(TOKEN, "Bearer", 1, 1),
        b"Tabc:" + encode(TOKEN, "Bearer", 1, 1),
        b"T1.5:" + encode(TOKEN, "Bearer", 1, 1),
        b"T100:garbage",
        b"T100:" + raw_value(payload(access_token="other")),
        b" T100:" + encode(TOKEN, "Bearer", 1, 1),
    ],
)
def test_garbage_announcement_is_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptValueError):
        decode_announcement(raw)


def test_announcement_with_absurd_ttl_is_corrupt() -> None:
    with pytest.raises(CorruptValueError):
        decode_announcement(b"T" + b"9" * 5000 + b":" + encode(TOKEN, "Bearer", 1, 1))


# -- properties ------------------------------------------------------------------------------

# JSON payloads without the pinned bugs above (deep nesting, integers beyond float range).
payload_objects = st.fixed_dictionaries(
    {},
    optional={
        "access_token": st.just(TOKEN) | st.text(max_size=10) | json_values,
        "token_type": st.sampled_from(["Bearer", "bearer", "mac"]) | json_values,
        "lifetime": st.integers(-5, 10**6) | st.floats(-1, 1e6) | json_values,
        "extra": json_values,
    },
)
structured_values = st.builds(
    lambda fence, token_digest, body: f"{fence}:{token_digest}:".encode() + body,
    st.integers(0, 10**19 - 1) | st.text(string.digits, max_size=21),
    st.just(digest(TOKEN)) | st.text("0123456789abcdef", min_size=31, max_size=33),
    payload_objects.map(lambda obj: json.dumps(obj).encode()) | st.binary(max_size=60),
)


@settings(max_examples=200, deadline=None, database=None)
@given(raw=st.binary(max_size=200) | structured_values)
def test_decode_of_arbitrary_bytes_returns_stored_token_or_raises_corrupt(raw: bytes) -> None:
    try:
        stored = decode(raw)
    except CorruptValueError:
        return
    assert isinstance(stored, StoredToken)
    assert stored.value
    assert len(stored.value) <= MAX_TOKEN_CHARS
    assert stored.token_type.lower() == "bearer"
    assert stored.lifetime > 0
    assert 0 <= stored.fence < 10**19
    assert raw.split(b":", 2)[1] == digest(stored.value).encode()


@settings(max_examples=100, deadline=None, database=None)
@given(
    raw=st.binary(max_size=60)
    | st.builds(lambda ttl, v: b"T" + ttl + b":" + v, st.binary(max_size=6), structured_values)
    | st.builds(lambda v: b"E" + v, st.binary(max_size=80))
)
def test_decode_announcement_returns_announcement_or_raises_corrupt(raw: bytes) -> None:
    try:
        ann = decode_announcement(raw)
    except CorruptValueError:
        return
    assert isinstance(ann, Announcement)
    # Exactly one kind: a token, a failure, a dropped token, an exchange under way or a lock
    # given back.
    kinds = [ann.stored is not None, ann.error_code is not None, ann.dropped is not None,
             ann.replacing, ann.released]  # fmt: skip
    assert kinds.count(True) == 1
    assert ann.ttl_ms >= 0


def test_round_trip_of_maximum_length_token() -> None:
    # The wire accepts only RFC 6750 (ASCII) bearer tokens, so this is the largest value stored.
    token = "A" * MAX_TOKEN_CHARS
    assert decode(encode(token, "Bearer", 3600, 1)).value == token


@settings(max_examples=100, deadline=None, database=None)
@given(
    # Up to MAX_TOKEN_CHARS of ASCII, or shorter text of any kind.
    token=st.text(string.printable, min_size=1, max_size=MAX_TOKEN_CHARS)
    | st.text(min_size=1, max_size=1000),
    token_type=st.sampled_from(["Bearer", "bearer", "BEARER"]),
    lifetime=st.floats(min_value=1e-6, max_value=MAX_LIFETIME) | st.integers(1, MAX_LIFETIME),
    fence=st.integers(0, 10**19 - 1),
)
def test_encode_decode_round_trip_property(
    token: str, token_type: str, lifetime: float, fence: int
) -> None:
    stored = decode(encode(token, token_type, lifetime, fence))
    assert stored == StoredToken(token, token_type, float(lifetime), fence)
