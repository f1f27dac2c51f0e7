"""The Django app: ``"k2_shared_token.contrib.django"`` in ``INSTALLED_APPS`` registers the
system check and drops the provider when a test overrides its settings."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.signals import setting_changed

from ..._core.errors import ConfigurationError
from . import SETTING, check_configuration, close_provider

CHECK_ID = "k2_shared_token.E001"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """A bad ``K2_SHARED_TOKEN`` (wrong key, bad value, unknown or non-Redis cache alias) is an
    Error at startup, with the library's own message."""
    try:
        check_configuration()
    except ConfigurationError as exc:
        return [
            checks.Error(
                str(exc),
                hint="The accepted keys are the provider's settings (README: Configuration), "
                "'redis' and 'cache'.",
                obj=f"settings.{SETTING}",
                id=CHECK_ID,
            )
        ]
    return []


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in (SETTING, "CACHES"):
        close_provider()


class K2SharedTokenConfig(AppConfig):  # type: ignore[misc]
    name = "k2_shared_token.contrib.django"
    label = "k2_shared_token"
    verbose_name = "K2 shared token"

    def ready(self) -> None:
        checks.register(check_settings)
        setting_changed.connect(_setting_changed, dispatch_uid="k2_shared_token")
