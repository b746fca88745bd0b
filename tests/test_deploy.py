"""deploy/: the docker-compose example holds together (no Docker daemon needed): every file it mounts
exists, its Sluice overlay is a valid environment of the shipped config, Prometheus scrapes the admin port
and loads the shipped rules, Grafana gets the shipped dashboard, and the image runs as a non-root user."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from engine import config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_services_and_mounts() -> None:
    services = _compose()["services"]
    assert set(services) == {"sluice", "postgres", "rabbitmq", "prometheus", "grafana"}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts {src}, which is missing"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["sluice"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["sluice"]["build"]["context"] / "Dockerfile").exists()
    assert services["sluice"]["command"] == ["run", "--env", "compose"]


def test_the_compose_overlay_is_a_valid_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for item in ("routes.yaml", "channels", "transforms"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    shutil.copy(DEPLOY / "routes.compose.yaml", tmp_path / "routes.compose.yaml")
    env = _compose()["services"]["sluice"]["environment"]
    monkeypatch.delenv("SLUICE_ADMIN_PORT", raising=False)  # tests/conftest.py sets 0
    monkeypatch.setenv("SLUICE_RABBITMQ_URL", "amqp://sluice:x@rabbitmq:5672/")
    monkeypatch.setenv("SLUICE_STORE", env["SLUICE_STORE"].replace("${POSTGRES_PASSWORD:-sluice-dev}", "x"))
    cfg = config.load(tmp_path / "routes.yaml", env="compose")
    assert cfg.store_url.startswith("postgresql+psycopg://sluice:x@postgres:5432/")
    assert cfg.admin.host == "0.0.0.0" and cfg.admin.port == 8080
    ch = cfg.channel("allscripts")
    assert ch.source.host == "0.0.0.0" and ch.source.port == 2575
    assert [r.destination for r in ch.routes] == ["demo-files", "broker"]
    assert cfg.destinations["broker"].kind == "rabbitmq"


def test_prometheus_and_grafana_use_the_shipped_rules_and_dashboard() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["sluice:8080"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    for rule in prom["rule_files"]:
        assert any(m.endswith(f":{rule}:ro") for m in mounts), rule
    graf = _compose()["services"]["grafana"]["volumes"]
    assert "./grafana/sluice.json:/var/lib/grafana/dashboards/sluice.json:ro" in graf
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sluice.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_runs_as_a_non_root_user_and_copies_what_exists() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is missing"
