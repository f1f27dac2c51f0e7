"""Settings validation, base URL normalisation and the namespace hash (pure: no Redis, no I/O)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from k2_shared_token._core.errors import ConfigurationError, K2TokenError
from k2_shared_token._core.settings import (
    PRODUCTION_URL,
    SANDBOX_URL,
    Settings,
    configuration_table,
    env_name,
    knobs,
    namespace_for,
    normalise_base_url,
    options_from_env,
)

CLIENT_ID = "acme-payments-client-id-7f3a"
CLIENT_SECRET = "s3cr3t-Vq8ZtL2pXw9Rk4Nm"


def build(**overrides: Any) -> Settings:
    kwargs: dict[str, Any] = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    kwargs.update(overrides)
    return Settings.build(**kwargs)


# -- base URL normalisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://sandbox.kopokopo.com", "https://sandbox.kopokopo.com"),
        ("HTTPS://Sandbox.KopoKopo.COM", "https://sandbox.kopokopo.com"),
        ("https://sandbox.kopokopo.com/", "https://sandbox.kopokopo.com"),
        ("https://sandbox.kopokopo.com///", "https://sandbox.kopokopo.com"),
        ("https://sandbox.kopokopo.com:443", "https://sandbox.kopokopo.com"),
        ("https://sandbox.kopokopo.com:443/", "https://sandbox.kopokopo.com"),
        ("  https://sandbox.kopokopo.com  ", "https://sandbox.kopokopo.com"),
        ("https://sandbox.kopokopo.com:8443", "https://sandbox.kopokopo.com:8443"),
        ("https://proxy.example/k2/", "https://proxy.example/k2"),
        ("https://proxy.example/K2/Api", "https://proxy.example/K2/Api"),  # paths keep case
        ("http://localhost:80/", "http://localhost"),
        ("http://LOCALHOST:8080/", "http://localhost:8080"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("http://127.0.0.2", "http://127.0.0.2"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("HTTP://[::1]:80", "http://[::1]"),
        ("https://[::1]:443/", "https://[::1]"),
        ("https://[2001:DB8::1]:8443", "https://[2001:db8::1]:8443"),
    ],
)
def test_normalise_base_url_canonical_form(raw: str, expected: str) -> None:
    assert normalise_base_url(raw) == expected


def test_normalise_base_url_is_idempotent() -> None:
    once = normalise_base_url("HTTPS://Api.KopoKopo.com:443/v1/")
    assert normalise_base_url(once) == once == "https://api.kopokopo.com/v1"


@pytest.mark.parametrize(
    "url", ["http://sandbox.kopokopo.com", "http://10.0.0.5:8080", "http://[2001:db8::1]/"]
)
def test_plain_http_refused_for_non_loopback_host(url: str) -> None:
    with pytest.raises(ConfigurationError, match="http://"):
        normalise_base_url(url)
    with pytest.raises(ConfigurationError):
        build(base_url=url)


def test_plain_http_allowed_for_non_loopback_when_explicitly_allowed() -> None:
    assert (
        normalise_base_url("http://Proxy.Internal:80/", allow_insecure_http=True)
        == "http://proxy.internal"
    )
    settings = build(base_url="http://proxy.internal:8080", allow_insecure_http=True)
    assert settings.base_url == "http://proxy.internal:8080"
    assert settings.token_url == "http://proxy.internal:8080/oauth/token"


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2pw@sandbox.kopokopo.com",
        "https://user@sandbox.kopokopo.com",
        "https://:hunter2pw@sandbox.kopokopo.com",
        "https://sandbox.kopokopo.com/?client_secret=hunter2pw",
        "https://sandbox.kopokopo.com/#frag",
    ],
)
def test_credentials_query_or_fragment_in_url_refused(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        normalise_base_url(url)
    assert "hunter2pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "ftp://sandbox.kopokopo.com",
        "sandbox.kopokopo.com",
        "https://",
        "https:///oauth",
        "https://sandbox.kopokopo.com:99999",
        "https://sandbox.kopokopo.com:port",
    ],
)
def test_malformed_base_url_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        normalise_base_url(url)


def test_non_string_base_url_refused() -> None:
    with pytest.raises(ConfigurationError):
        normalise_base_url(None)  # type: ignore[arg-type]


# -- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["client_id", "client_secret"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n", None, 42])
def test_empty_or_non_string_credentials_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=field):
        build(**{field: value})


def test_configuration_error_is_both_package_error_and_value_error() -> None:
    with pytest.raises(K2TokenError):
        build(client_secret="")
    with pytest.raises(ValueError, match="client_secret"):
        build(client_secret="")


# -- refresh windows and timeouts ------------------------------------------------------------


@pytest.mark.parametrize(("min_validity", "refresh_ahead"), [(300, 300), (301, 300), (10, 5)])
def test_min_validity_not_below_refresh_ahead_refused(
    min_validity: float, refresh_ahead: float
) -> None:
    with pytest.raises(ConfigurationError, match="min_validity"):
        build(min_validity=min_validity, refresh_ahead=refresh_ahead)


def test_min_validity_zero_is_allowed() -> None:
    assert build(min_validity=0).min_validity == 0.0


@pytest.mark.parametrize(
    "name",
    [
        "refresh_ahead",
        "min_validity",
        "lock_lease",
        "wait_timeout",
        "exchange_deadline",
        "connect_timeout",
        "read_timeout",
        "local_max_age",
    ],
)
@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, math.inf, -math.inf, True, False, "10"])
def test_negative_nan_infinite_bool_or_text_window_refused(name: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        build(**{name: bad})


@pytest.mark.parametrize(
    "name",
    ["refresh_ahead", "lock_lease", "wait_timeout", "exchange_deadline", "local_max_age"],
)
def test_zero_refused_where_a_positive_duration_is_required(name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        build(**{name: 0})


@pytest.mark.parametrize("deadline", [15, 15.0, 20, 1000])
def test_exchange_deadline_not_shorter_than_lock_lease_refused(deadline: float) -> None:
    with pytest.raises(ConfigurationError, match="exchange_deadline"):
        build(lock_lease=15, exchange_deadline=deadline)


def test_explicit_exchange_deadline_inside_lease_is_kept() -> None:
    assert build(lock_lease=15, exchange_deadline=14.9).exchange_deadline == 14.9


@pytest.mark.parametrize("lease", [0.01, 1, 5, 15, 120])
def test_default_exchange_deadline_ends_inside_the_lease(lease: float) -> None:
    settings = build(lock_lease=lease)
    assert 0 < settings.exchange_deadline < settings.lock_lease
    assert settings.exchange_deadline == pytest.approx(0.8 * lease)


@pytest.mark.parametrize("attempts", [0, -1, True, 2.0, "3", None])
def test_bad_max_attempts_refused(attempts: object) -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        build(max_attempts=attempts)


def test_defaults_are_valid_and_converted_to_float() -> None:
    settings = build()
    assert settings.base_url == SANDBOX_URL
    assert settings.token_url == SANDBOX_URL + "/oauth/token"
    assert settings.key_prefix == "k2"
    assert (settings.refresh_ahead, settings.min_validity) == (300.0, 30.0)
    assert isinstance(settings.refresh_ahead, float)
    assert settings.max_attempts == 4
    assert settings.local_cache is True


# -- key prefix --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    ["", "k2 prod", "{k2}", "k2{x", "k2}", " k2", "k2/prod", "k\u00e92", "x" * 65, None, 7],
)
def test_bad_key_prefix_refused(prefix: object) -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        build(key_prefix=prefix)


@pytest.mark.parametrize("prefix", ["k2", "acme.k2:prod-1_a", "x" * 64, "K2"])
def test_good_key_prefix_accepted(prefix: str) -> None:
    assert build(key_prefix=prefix).key_prefix == prefix


def test_key_prefix_with_trailing_newline_refused() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        build(key_prefix="k2\n")


# -- namespace -----------------------------------------------------------------------------------


def test_namespace_is_16_hex_characters() -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", build().namespace)


def test_namespace_differs_for_different_client_ids() -> None:
    assert build(client_id="app-one").namespace != build(client_id="app-two").namespace


def test_namespace_differs_for_client_ids_differing_only_in_case() -> None:
    assert build(client_id="AppOne").namespace != build(client_id="appone").namespace


def test_namespace_differs_for_different_base_paths() -> None:
    first = build(base_url="https://proxy.example/Tenant-A")
    assert first.namespace != build(base_url="https://proxy.example/tenant-a").namespace
    assert first.namespace != build(base_url="https://proxy.example").namespace


def test_namespace_differs_for_sandbox_and_production() -> None:
    sandbox = build(base_url=SANDBOX_URL)
    production = build(base_url=PRODUCTION_URL)
    assert sandbox.namespace != production.namespace


@pytest.mark.parametrize(
    "spelling",
    [
        "https://sandbox.kopokopo.com/",
        "HTTPS://SANDBOX.KOPOKOPO.COM",
        "https://sandbox.kopokopo.com:443",
        "https://Sandbox.KopoKopo.com:443/",
        " https://sandbox.kopokopo.com// ",
    ],
)
def test_namespace_equal_for_equivalent_url_spellings(spelling: str) -> None:
    assert build(base_url=spelling).namespace == build(base_url=SANDBOX_URL).namespace


def test_namespace_matches_namespace_for_over_normalised_url() -> None:
    settings = build(base_url="HTTPS://api.kopokopo.com:443/")
    assert settings.namespace == namespace_for(PRODUCTION_URL, CLIENT_ID)


def test_namespace_does_not_depend_on_the_secret() -> None:
    # Rotating the secret must not orphan the shared cache.
    assert build(client_secret="old-secret").namespace == build(client_secret="new").namespace


def test_namespace_has_no_client_id_or_secret_in_clear() -> None:
    for client_id in (CLIENT_ID, "acme", "0123456789abcdef"):
        namespace = build(client_id=client_id).namespace
        assert client_id not in namespace
        assert CLIENT_SECRET not in namespace
    assert CLIENT_ID not in namespace_for(SANDBOX_URL, CLIENT_ID)


def test_repr_and_str_have_no_secret() -> None:
    settings = build()
    assert CLIENT_SECRET not in repr(settings)
    assert CLIENT_SECRET not in str(settings)
    assert "client_secret" not in repr(settings)
    assert settings.client_secret == CLIENT_SECRET  # still available to the exchange


def test_settings_are_frozen() -> None:
    settings = build()
    with pytest.raises(AttributeError):
        settings.client_secret = "other"  # type: ignore[misc]


# -- each setting declared once --------------------------------------------------------------


def test_the_readme_configuration_table_is_the_declarations() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert configuration_table() in readme, "README table is stale: paste configuration_table()"


def test_from_env_reads_every_setting() -> None:
    samples = {"seconds": "7", "keys": "a,b"}
    env = {"K2_CLIENT_ID": "id", "K2_CLIENT_SECRET": "secret"}
    for f in knobs():
        kind = f.metadata["kind"]
        raw = {
            "on_redis_error": "raise",
            "base_url": "https://sandbox.kopokopo.com",
            "key_prefix": "tenant-a",
            "max_attempts": "3",
            "local_cache": "0",
            "allow_insecure_http": "1",
            "encryption_keys": samples["keys"],
        }.get(f.name, samples["seconds"])
        env.setdefault(env_name(f), raw)
        assert kind.parse(env[env_name(f)]) is not None or f.name == "exchange_deadline"
    options = options_from_env(env, {})
    assert set(options) - {"redis"} == {f.name for f in knobs()}


def test_an_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting.*refresh_ahed"):
        Settings.build(client_id="id", client_secret="secret", refresh_ahed=10)
