"""docker-compose.yml structure and Dockerfile lint, without Docker (``make compose-test`` runs the stack)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
LINTED = (*DOCKERFILES, "docker/redis.Dockerfile", "docker/seaweedfs.Dockerfile")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def _cmd(service: dict[str, Any]) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


def _health(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "s3", "api", "worker", "worker-gpu"}
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in services[name] for name in ("redis", "s3", "api", "worker"))
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = _cmd(redis)
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-alpine)?", redis["image"]), "pin the redis image version"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert _health(redis) == "CMD redis-cli ping"


def test_commands_and_queues(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "api.main:create_app" in _cmd(services["api"]) and "--factory" in _cmd(services["api"])
    assert _cmd(services["worker"]).startswith("nucseg worker --device cpu --queues cpu")
    assert _cmd(services["worker-gpu"]).startswith("nucseg worker --device cuda --queues gpu")
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["NUCSEG_REDIS_URL"] == "redis://redis:6379/0" and env["NUCSEG_DATA_DIR"] == "/data"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert services["api"]["ports"] == ["127.0.0.1:${NUCSEG_API_PORT:-8000}:8000"]
    assert "TORCH_INDEX_URL" in services["worker-gpu"]["build"]["args"]
    assert "cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[1]


def test_the_store_is_the_s3_service_and_no_disk_is_shared(compose: dict[str, Any]) -> None:
    services = compose["services"]
    s3 = services["s3"]
    assert s3["build"]["dockerfile"] == "docker/seaweedfs.Dockerfile" and "ports" not in s3  # network only
    assert "s3-data:/data" in s3["volumes"] and set(compose["volumes"]) == {"s3-data", "redis-data"}
    for name in ("api", "worker", "worker-gpu"):
        env, volumes = services[name]["environment"], services[name]["volumes"]
        assert env["NUCSEG_STORAGE_URL"].endswith("s3://nucseg/jobs}")
        assert env["NUCSEG_S3_ENDPOINT_URL"].endswith("http://s3:8333}")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == s3["environment"][key]  # the same keys on both sides
        assert not any(v.split(":")[1] == "/data" for v in volumes)  # scratch is the container's own
        assert any(v.endswith(":/slides:ro") for v in volumes)


def test_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "/healthz" in _health(services["api"])
    for name in ("worker", "worker-gpu"):
        check = _health(services[name])
        assert "celery -A core.celery_app inspect ping" in check
        hostname = _cmd(services[name]).split("--hostname ")[1].split()[0]
        assert hostname == "nucseg@%h" and "-d nucseg@$$HOSTNAME" in check  # pings exactly this worker


@pytest.mark.parametrize("name", LINTED)
def test_dockerfile_passes_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--failure-threshold", "info", name], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_multi_stage_non_root_and_pinned(name: str) -> None:
    text = (REPO / name).read_text()
    assert text.count("\nFROM ") >= 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "requirements/" in text  # installs from the pinned locks
    assert "HEALTHCHECK" in text


def test_api_image_has_no_torch() -> None:
    """What the API imports is checked against the copied packages in ``test_api_no_torch.py``."""
    instructions = [line for line in (REPO / "Dockerfile.api").read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    assert not any("torch" in line.lower() for line in instructions)
    lock = (REPO / "requirements" / "api.txt").read_text().lower()
    assert not re.search(r"^(torch|torchvision|segmentation-models-pytorch)==", lock, re.M)


def test_celery_app_is_found_by_the_healthcheck_command() -> None:
    """``celery -A core.celery_app`` (the healthcheck) resolves our app without a broker round trip."""
    code = "from celery.app.utils import find_app; print(find_app('core.celery_app').main)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "nucseg", out.stderr


def test_auth_is_on_with_a_read_only_tenants_file(compose: dict[str, Any]) -> None:
    """The containers serve on all interfaces, so they need keys; the API's own check agrees."""
    from core.settings import ConfigError, Settings

    services = compose["services"]
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["NUCSEG_AUTH"] == "enabled" and env["NUCSEG_TENANTS_FILE"] == "/config/tenants.json"
        assert any(v.endswith(":/config/tenants.json:ro") for v in services[name]["volumes"])
    example = REPO / "config" / "tenants.example.json"
    api_env = services["api"]["environment"]
    settings = Settings(tenants_file=example, auth=api_env["NUCSEG_AUTH"], host=api_env["NUCSEG_HOST"])
    settings.check_api_bind(settings.host)  # keys configured: starts on 0.0.0.0
    with pytest.raises(ConfigError, match="only on a loopback"):
        Settings(auth="disabled").check_api_bind(api_env["NUCSEG_HOST"])
    with pytest.raises(ConfigError, match="no API key is configured"):
        Settings(tenants_file=None, auth="enabled").check_api_bind("0.0.0.0")


def test_local_override_changes_only_bases_and_torch_index(compose: dict[str, Any]) -> None:
    """compose.local.yml (no registry reachable) swaps base images and the torch index, nothing else."""
    local = yaml.safe_load((REPO / "compose.local.yml").read_text())["services"]
    assert set(local) == set(compose["services"])
    assert set(local["redis"]) == {"image"}
    for name in ("api", "worker", "worker-gpu"):
        assert set(local[name]) == {"build"} and set(local[name]["build"]) == {"args"}
        assert "PYTHON_IMAGE" in local[name]["build"]["args"]
    assert "TORCH_INDEX_URL" not in local["api"]["build"]["args"]  # the API image has no torch
    assert all("TORCH_INDEX_URL" in local[name]["build"]["args"] for name in ("worker", "worker-gpu"))
