"""FHIR → HL7 v2 orders (``fhir-to-hl7``, ``order_message``): a ServiceRequest as ORM^O01 or OML^O21,
checked against golden messages, read back by Sluice's own inbound converter (round trip), valid for its
HL7 structure, and the same update-by-ID decisions as every write-back message (synthetic data)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest

from engine.errors import ConfigError
from engine.hl7 import parse_bytes
from engine.validation import check_structure
from tests.transforms.conftest import EXPECTED, resources
from transforms.convert import convert as inbound
from transforms.fhir_to_v2.convert import convert
from transforms.fhir_to_v2.outbound import NEVER_SENT, UNCHANGED, Outbound, Sent, decide
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.settings import ConvertSettings

PLACER = "urn:portal:order"
ORM = WritebackSettings(sending_application="SLUICE", sending_facility="PORTAL", placer_system=PLACER)
OML = WritebackSettings(
    sending_application="SLUICE", sending_facility="PORTAL", placer_system=PLACER, order_message="OML^O21"
)
INBOUND = ConvertSettings(site_tz="America/Los_Angeles", derive_unknown_systems=True)
GOLDEN = EXPECTED / "fhir_to_v2"
UCUM = "http://unitsofmeasure.org"

ORDER: dict[str, Any] = {
    "resourceType": "ServiceRequest",
    "id": "sr-1",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-01T18:05:00Z"},
    "contained": [
        {
            "resourceType": "Specimen",
            "id": "spec1",
            "identifier": [{"system": "urn:portal:specimen", "value": "SP-9"}],
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0487",
                        "code": "BLD",
                        "display": "Whole blood",
                    }
                ]
            },
            "collection": {
                "collectedDateTime": "2026-12-02T16:30:00Z",
                "quantity": {"value": 5, "unit": "mL", "system": UCUM, "code": "mL"},
                "bodySite": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": "368208006", "display": "Left upper arm"}
                    ]
                },
            },
            "container": [{"type": {"text": "Lavender top"}}],
        },
        {
            "resourceType": "Condition",
            "id": "dx1",
            "code": {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/sid/icd-10-cm",
                        "code": "E11.9",
                        "display": "Type 2 diabetes",
                    }
                ]
            },
            "verificationStatus": {"coding": [{"code": "confirmed"}]},
        },
        {
            "resourceType": "Observation",
            "id": "obs1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
            "valueQuantity": {"value": 72.5, "unit": "kg", "system": UCUM, "code": "kg"},
        },
        {
            "resourceType": "Encounter",
            "id": "enc1",
            "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "identifier": [{"system": "urn:portal:visit", "value": "V-55"}],
        },
    ],
    "identifier": [{"system": PLACER, "value": "ORD-77"}],
    "status": "active",
    "intent": "order",
    "code": {
        "coding": [
            {"system": "http://loinc.org", "code": "24323-8", "display": "Comprehensive metabolic panel"}
        ]
    },
    "subject": {"reference": "Patient/pat-1", "display": "Testperson, Alexandra"},
    "encounter": {"reference": "#enc1"},
    "requester": {"reference": "Practitioner/prac-1", "display": "Dana Synthetic"},
    "authoredOn": "2026-12-01T18:00:00Z",
    "priority": "stat",
    "occurrenceDateTime": "2026-12-02T16:00:00Z",
    "reasonCode": [
        {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]}
    ],
    "reasonReference": [{"reference": "#dx1"}],
    "supportingInfo": [{"reference": "#obs1"}],
    "specimen": [{"reference": "#spec1"}, {"reference": "Specimen/sp-2", "display": "Urine"}],
    "note": [{"text": "Fasting | 12h\nsecond line"}],
}


def order(**changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(ORDER)
    res.update(changes)
    return res


def assert_golden_hl7(name: str, payload: bytes) -> None:
    """``payload`` (segments one a line) equals ``expected/fhir_to_v2/<name>.hl7``; ``SLUICE_REGEN_GOLDEN=1``
    rewrites it first (review the diff before committing)."""
    path = GOLDEN / f"{name}.hl7"
    text = payload.decode("utf-8").replace("\r", "\n")
    if os.environ.get("SLUICE_REGEN_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path.name}: run with SLUICE_REGEN_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8")


def read_back(payload: bytes) -> dict[str, Any]:
    return inbound(parse_bytes(payload), INBOUND)


def sent(out: Outbound, message: str) -> Sent:
    return Sent(out.state, out.content, out.timing, message)


@pytest.mark.parametrize(
    ("name", "res", "settings", "control"),
    [
        pytest.param("orm_o01_nw", ORDER, ORM, "NW", id="orm-nw"),
        pytest.param("oml_o21_nw", ORDER, OML, "NW", id="oml-nw"),
        pytest.param("oml_o21_xo_on_hold", order(status="on-hold"), OML, "XO", id="oml-xo"),
        pytest.param("oml_o21_ca", order(status="revoked"), OML, "CA", id="oml-ca"),
    ],
)
def test_golden_messages_valid_for_their_structure(
    name: str, res: dict[str, Any], settings: WritebackSettings, control: str
) -> None:
    out = convert(res, settings)
    payload = out.variants[control]
    assert_golden_hl7(name, payload)
    msg = parse_bytes(payload)
    assert msg["ORC-1"] == control
    check_structure(msg)  # the HL7 v2.5.1 structure (MSH-9.3) per hl7apy: segments, order, cardinality


def test_oml_round_trips_through_the_inbound_converter() -> None:
    out = convert(ORDER, OML)
    assert out.state == "active" and set(out.variants) == {"NW", "XO"}
    msg = parse_bytes(out.variants["NW"])
    assert (msg.message_type, msg.trigger, msg["MSH-9.3"]) == ("OML", "O21", "OML_O21")
    assert [s.name for s in msg.segments] == [
        "MSH", "PID", "PV1", "ORC", "TQ1", "OBR", "NTE", "NTE", "DG1", "OBX", "SPM", "SPM",
    ]  # fmt: skip
    bundle = read_back(out.variants["NW"])
    (sr,) = resources(bundle, "ServiceRequest")
    placer = [i for i in sr["identifier"] if i["type"]["coding"][0]["code"] == "PLAC"]
    assert [(i["system"], i["value"]) for i in placer] == [(PLACER, "ORD-77")]
    assert (sr["status"], sr["intent"], sr["priority"]) == ("active", "order", "stat")
    assert sr["code"] == ORDER["code"]
    assert sr["occurrenceDateTime"] == "2026-12-02T08:00:00-08:00"  # TQ1-7, the same instant in the site zone
    assert sr["authoredOn"] == "2026-12-01T10:00:00-08:00"
    assert sr["requester"]["display"] == "Dana Synthetic"
    assert sr["reasonCode"] == ORDER["reasonCode"]
    assert sr["note"][0]["text"] == "Fasting | 12h\nsecond line"  # escaped, line by line
    (enc,) = resources(bundle, "Encounter")
    assert enc["class"]["code"] == "AMB" and enc["identifier"][0]["value"] == "V-55"
    (cond,) = resources(bundle, "Condition")
    assert cond["code"] == ORDER["contained"][1]["code"]
    assert cond["verificationStatus"]["coding"][0]["code"] == "confirmed"
    (obs,) = resources(bundle, "Observation")
    assert obs["status"] == "final" and obs["valueQuantity"] == ORDER["contained"][2]["valueQuantity"]
    spec, referenced = resources(bundle, "Specimen")
    contained = ORDER["contained"][0]
    assert spec["identifier"][0]["value"] == "SP-9" and spec["type"] == contained["type"]
    assert spec["collection"]["quantity"] == contained["collection"]["quantity"]
    assert spec["collection"]["bodySite"] == contained["collection"]["bodySite"]
    assert spec["collection"]["collectedDateTime"] == "2026-12-02T08:30:00-08:00"
    assert spec["container"] == contained["container"]
    assert referenced["identifier"][0]["value"] == "sp-2" and referenced["type"] == {"text": "Urine"}
    assert len(sr["specimen"]) == 2 and len(sr["supportingInfo"]) == 1 and len(sr["reasonReference"]) == 1


def test_coding_systems_name_local_and_shipped_systems_in_cwe_3() -> None:
    local = "http://lab.example.org/codes"
    res = order(code={"coding": [{"system": local, "code": "CMP-1", "display": "Metabolic panel"}]})
    systems = {"99LAB": local, "I10C": "http://hl7.org/fhir/sid/icd-10-cm", "LABX": local}
    settings = WritebackSettings(placer_system=PLACER, order_message="OML^O21", coding_systems=systems)
    msg = parse_bytes(convert(res, settings).variants["NW"])
    assert msg["OBR-4"] == "CMP-1^Metabolic panel^99LAB"  # the first name listed for the URI
    assert msg["DG1-3"] == "E11.9^Type 2 diabetes^I10C"  # over the shipped name (I10)
    assert msg["OBX-3"] == "29463-7^Body weight^LN"  # systems the block does not name: the shipped names
    bundle = inbound(
        parse_bytes(convert(res, settings).variants["NW"]),
        ConvertSettings(derive_unknown_systems=True, coding_systems=systems),
    )
    (sr,) = resources(bundle, "ServiceRequest")
    assert sr["code"] == res["code"]
    (cond,) = resources(bundle, "Condition")
    assert cond["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"


def test_oml_order_status_and_cancel() -> None:
    held = convert(order(status="on-hold"), OML)
    assert held.state == "active" and parse_bytes(held.variants["XO"])["ORC-5"] == "HD"
    (sr,) = resources(read_back(held.variants["XO"]), "ServiceRequest")
    assert sr["status"] == "on-hold"
    cancel = convert(order(status="revoked"), OML)
    assert list(cancel.variants) == ["CA"]
    (sr,) = resources(read_back(cancel.variants["CA"]), "ServiceRequest")
    assert sr["status"] == "revoked"
    deleted = convert(order(status="entered-in-error"), OML)
    assert deleted.state == "deleted" and parse_bytes(deleted.variants["CA"])["ORC-5"] == "ER"


def test_oml_update_by_id_decisions() -> None:
    new = convert(ORDER, OML)
    assert decide(new, None) == ("NW", "")
    # a new version with nothing the OML carries changed sends nothing
    bumped = convert(order(meta={"versionId": "2", "lastUpdated": "2026-12-03T10:00:00Z"}), OML)
    assert bumped.content == new.content and decide(bumped, sent(new, "NW")) == (None, UNCHANGED)
    # a change of anything it carries (here the contained specimen's type, an SPM field) is an XO
    spec = copy.deepcopy(ORDER["contained"])
    spec[0]["type"] = {"text": "Serum"}
    changed = convert(order(contained=spec), OML)
    assert decide(changed, sent(new, "NW")) == ("XO", "")
    cancel = convert(order(status="revoked"), OML)
    assert decide(cancel, sent(new, "NW")) == ("CA", "")
    assert decide(cancel, None) == (None, NEVER_SENT)
    # the key is the placer number, whichever message the channel writes
    assert new.key == convert(ORDER, ORM).key == f"ServiceRequest|{PLACER}|ORD-77"


def test_oml_before_v2_5_times_go_in_orc_7() -> None:
    v24 = WritebackSettings(placer_system=PLACER, order_message="OML^O21", version="2.4")
    msg = parse_bytes(convert(ORDER, v24).variants["NW"])
    assert msg.first("TQ1") is None and msg["ORC-7"] == "^^^20261202080000-0800^^S"
    # no SPM before v2.5 either: the contained specimen's collection time and type are OBR-7 and OBR-15
    assert msg.first("SPM") is None and msg["OBR-7"] == "20261202083000-0800"
    assert msg["OBR-15"] == "BLD&Whole blood&HL70487"
    check_structure(msg)
    bundle = read_back(convert(ORDER, v24).variants["NW"])
    (sr,) = resources(bundle, "ServiceRequest")
    assert (sr["occurrenceDateTime"], sr["priority"]) == ("2026-12-02T08:00:00-08:00", "stat")
    (spec,) = resources(bundle, "Specimen")
    assert spec["type"] == ORDER["contained"][0]["type"]
    assert spec["collection"]["collectedDateTime"] == "2026-12-02T08:30:00-08:00"


def test_oml_minimal_order_and_timing_pattern() -> None:
    minimal = {
        "resourceType": "ServiceRequest",
        "id": "sr-9",
        "status": "active",
        "intent": "reflex-order",
        "subject": {"reference": "#p"},
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.999.1", "value": "MRN9"}],
                "name": [{"family": "Testperson", "given": ["Robin"]}],
                "birthDate": "1990-01-02",
            }
        ],
        "code": {"text": "Glucose, fasting"},
        "occurrenceTiming": {
            "code": {"coding": [{"code": "BID"}]},
            "repeat": {"boundsPeriod": {"start": "2026-12-02T16:00:00Z", "end": "2026-12-09T16:00:00Z"}},
        },
    }
    msg = parse_bytes(convert(minimal, OML).variants["NW"])
    assert [s.name for s in msg.segments] == ["MSH", "PID", "ORC", "TQ1", "OBR"]
    check_structure(msg)
    assert msg["PID-3.1"] == "MRN9" and msg["PID-7"] == "19900102" and msg["OBR-11"] == "G"
    assert msg["ORC-2"] == "sr-9^SLUICE" and msg["TQ1-3"] == "BID"
    (sr,) = resources(read_back(convert(minimal, OML).variants["NW"]), "ServiceRequest")
    assert sr["intent"] == "reflex-order" and sr["occurrenceTiming"]["code"]["coding"][0]["code"] == "BID"
    assert sr["occurrenceTiming"]["repeat"]["boundsPeriod"]["end"] == "2026-12-09T08:00:00-08:00"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"order_message": "OML^021"}, "did you mean 'OML^O21'", id="typo"),
        pytest.param({"order_message": "OML"}, "did you mean 'OML^O21'", id="prefix"),
        pytest.param({"order_mesage": "OML^O21"}, "did you mean 'order_message'", id="key"),
        pytest.param({"order_message": "OML^O21", "version": "2.3"}, "from v2.4 on", id="version"),
        pytest.param(
            {"order_message": "ORM^O01", "version": "2.7"}, "withdrew it in v2.7", id="orm-withdrawn"
        ),
    ],
)
def test_order_message_option_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(match)) as exc:
        WritebackSettings.from_options(options, "channels/orders.yaml", "transform[0].fhir-to-hl7")
    assert exc.value.file == "channels/orders.yaml"
    assert str(exc.value.key).startswith("transform[0].fhir-to-hl7.order_")


def test_golden_folder_is_read_by_the_structure_test() -> None:
    """tests/engine/test_validation.py validates every message in the golden folder as well."""
    from tests.engine import test_validation

    assert {p.name for p in GOLDEN.glob("*.hl7")} <= {p.name for p in test_validation.WRITTEN}
    assert Path(GOLDEN).is_dir()


@pytest.mark.parametrize(
    ("version", "message"),
    [("2.3", "ORM^O01"), ("2.5.1", "ORM^O01"), ("2.6", "ORM^O01"), ("2.7", "OML^O21"), ("2.8", "OML^O21")],
)
def test_without_order_message_the_version_decides(version: str, message: str) -> None:
    """ORM^O01 is the default while HL7 defines it; from v2.7 on (withdrawn) OML^O21, so every message a
    channel writes is a structure of its MSH-12 version."""
    settings = WritebackSettings.from_options({"version": version, "placer_system": PLACER}, "c.yaml", "t")
    msg = parse_bytes(convert(ORDER, settings).variants["NW"])
    assert f"{msg.message_type}^{msg.trigger}" == message and msg.version == version
    if version in ("2.5.1", "2.6", "2.7", "2.8"):  # (hl7apy has no 2.3 OML; v2.3 is ORM's anyway)
        check_structure(msg)
