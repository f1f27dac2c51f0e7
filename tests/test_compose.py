"""docker-compose.yml cannot rot silently: every command, file and variable it names exists.

No Docker engine runs in CI, so this checks the file against the repository instead: the
services the README promises, the files their commands and the Dockerfile refer to, the CLI
flags they pass (parsed by our own argument parser) and the K2_* variables from_env() reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_shared_token._cli.main import parse
from k2_shared_token._core.settings import env_name, knobs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_the_promised_services_exist_with_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "fake-k2", "web", "worker", "loadgen"} <= set(services)
    for name in ("redis", "fake-k2", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        assert "build" in service or "image" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    # web must be scalable: no fixed host port that a second replica would fight over
    assert "ports" not in services["web"]


def test_every_referenced_file_and_module_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        words = [w for w in service.get("command", []) if isinstance(w, str)]
        for word in words:
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), (name, word)
            module = re.fullmatch(r"(examples\.\w+)(?::(\w+))?", word)
            if module:
                path = ROOT / (module.group(1).replace(".", "/") + ".py")
                assert path.is_file(), (name, word)
                if module.group(2):
                    assert re.search(rf"^(def |){module.group(2)}\b", path.read_text(), re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_our_own_commands_parse(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        command = service.get("command", [])
        if command[:3] == ["python", "-m", "k2_shared_token"]:
            args = parse(command[3:])
            assert callable(args.run)


def test_every_k2_variable_is_one_from_env_reads(compose: dict[str, Any]) -> None:
    known = {env_name(f) for f in knobs()} | {"K2_REDIS_URL"}
    anchors = {k: v for k, v in compose.items() if k.startswith("x-")}
    for block in [
        *anchors.values(),
        *(s.get("environment", {}) for s in compose["services"].values()),
    ]:
        for variable in block:
            if variable.startswith("K2_"):
                assert variable in known, variable
    # The shared block really reaches the services that need credentials.
    for name in ("web", "worker"):
        assert "K2_CLIENT_ID" in compose["services"][name]["environment"], name
