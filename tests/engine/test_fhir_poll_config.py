"""``source: {kind: fhir-poll}`` config: the issue's channel loads as written; mistakes name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import config as config_mod
from engine.errors import ConfigError
from tests.support.engine import write_config

ISSUE_CHANNEL = """
name: portal-appointments
source: {kind: fhir-poll, base_url: http://127.0.0.1:8089/fhir, resources: [Appointment], interval: 2}
transform:
  - fhir-to-hl7: {sending_application: SLUICE, sending_facility: PORTAL, placer_system: "urn:portal:appointment"}
routes:
  - destination: ehr-mllp
"""


def load(tmp_path: Path, source: dict[str, Any] | None = None) -> config_mod.Config:
    routes = write_config(
        tmp_path,
        channels={},
        destinations={"ehr-mllp": {"kind": "mllp", "host": "127.0.0.1", "port": 2576, "payload": "output"}},
    )
    body = yaml.safe_load(ISSUE_CHANNEL)
    if source is not None:
        body["source"] = source
    (tmp_path / "channels" / "portal-appointments.yaml").write_text(yaml.safe_dump(body))
    return config_mod.load(routes)


def test_the_issues_channel_loads(tmp_path: Path) -> None:
    (ch,) = load(tmp_path).channels
    assert ch.source.kind == "fhir-poll" and ch.source.poll is not None
    assert ch.source.poll.base_url == "http://127.0.0.1:8089/fhir"
    assert ch.source.poll.resources == ("Appointment",) and ch.source.poll.interval == 2.0


BASE = {"kind": "fhir-poll", "base_url": "http://127.0.0.1:8089/fhir", "resources": ["Appointment"]}


@pytest.mark.parametrize(
    ("source", "key", "match"),
    [
        pytest.param({**BASE, "base_url": "ftp://x"}, "source.base_url", "FHIR base", id="base-url"),
        pytest.param({**BASE, "resources": []}, "source.resources", "resource types", id="no-resources"),
        pytest.param(
            {**BASE, "resources": ["appointment"]}, "source.resources", "resource types", id="lowercase"
        ),
        pytest.param(
            {**BASE, "params": {"_lastUpdated": "gt2020"}}, "source.params", "the poller sets", id="params"
        ),
        pytest.param({**BASE, "page_size": 0}, "source.page_size", "1 to 1000", id="page-size"),
        pytest.param({**BASE, "interval": 0}, "source.interval", "more than 0", id="interval"),
        pytest.param({**BASE, "port": 2575}, "source.port", "unknown key", id="listener-key"),
        pytest.param({**BASE, "kind": "http-push"}, "source.kind", "not allowed", id="kind"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, source: dict[str, Any], key: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        load(tmp_path, source)
    assert exc.value.key == key and str(exc.value.file).endswith("portal-appointments.yaml")


def test_the_shipped_channel_is_the_issues_and_disabled_until_configured() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = config_mod.load(root / "routes.yaml")
    (ch,) = [c for c in cfg.channels if c.name == "portal-appointments"]
    assert not ch.enabled
    assert ch.source.kind == "fhir-poll" and ch.source.poll is not None
    assert ch.source.poll.resources == ("Appointment",) and ch.source.poll.interval == 2.0
    assert [r.destination for r in ch.routes] == ["ehr-mllp"]
    assert ch.transform == (
        {
            "fhir-to-hl7": {
                "sending_application": "SLUICE",
                "sending_facility": "PORTAL",
                "placer_system": "urn:portal:appointment",
            }
        },
    )
    ehr = cfg.destinations["ehr-mllp"]
    assert ehr.kind == "mllp" and ehr.options["payload"] == "output"


def test_order_by_is_a_fhirpath_on_a_fhir_source(tmp_path: Path) -> None:
    from engine.sources import resources

    routes = write_config(
        tmp_path,
        channels={},
        destinations={"ehr-mllp": {"kind": "mllp", "host": "127.0.0.1", "port": 2576, "payload": "output"}},
    )
    body = yaml.safe_load(ISSUE_CHANNEL)
    body["order_by"] = "Appointment.participant.actor.reference"
    path = tmp_path / "channels" / "portal-appointments.yaml"
    path.write_text(yaml.safe_dump(body))
    (ch,) = config_mod.load(routes).channels
    res = {
        "resourceType": "Appointment",
        "id": "a1",
        "participant": [{"actor": {"display": "room"}}, {"actor": {"reference": "Patient/p7"}}],
    }
    row = resources.message_row(
        ch.name, res, b"{}", source="fhir-poll", facility="h", received_at=0.0, order_by=ch.order_by
    )
    assert row.order_key == "Patient/p7"
    # no value there: the resource's own key, so its versions still keep their order
    bare = resources.message_row(
        ch.name,
        {"resourceType": "Appointment", "id": "a2"},
        b"{}",
        source="s",
        facility="h",
        received_at=0.0,
        order_by=ch.order_by,
    )
    assert bare.order_key == "Appointment/a2"
    body["order_by"] = "PID-3.1"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="FHIRPath") as exc:
        config_mod.load(routes)
    assert exc.value.key == "order_by"
