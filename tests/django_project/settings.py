"""A minimal Django project for the contrib.django tests: the test client (tests override the
K2 and cache settings) and a real gunicorn fleet (which gets them from the environment that
tests.deploy_helpers.fleet_env builds)."""

from __future__ import annotations

import os

SECRET_KEY = "k2-shared-token-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.django_project.urls"
INSTALLED_APPS = ["k2_shared_token.contrib.django"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

REDIS_URL = os.environ.get("K2_REDIS_URL", "redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": os.environ.get(
            "DJANGO_CACHE_BACKEND", "django.core.cache.backends.redis.RedisCache"
        ),
        "LOCATION": REDIS_URL,
    }
}

# Strings from the environment are read as from_env reads them ("2.0" is 2 s).
K2_SHARED_TOKEN = {
    "client_id": os.environ.get("K2_CLIENT_ID", "django-tests"),
    "client_secret": os.environ.get("K2_CLIENT_SECRET", "django-tests-secret"),
    "base_url": os.environ.get("K2_BASE_URL", "http://127.0.0.1:9"),
    "refresh_ahead": os.environ.get("K2_REFRESH_AHEAD", "300"),
    "min_validity": os.environ.get("K2_MIN_VALIDITY", "30"),
    "cache": "default",  # the token lives beside the cache, on its connection pool
}
