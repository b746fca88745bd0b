"""Orders, lab-order results and referrals (issue #14): ORM^O01, OML^O21, OMG^O19 → ServiceRequest (+ Specimen);
OUL^R22/R23/R24 → Specimen + DiagnosticReport + Observation; REF^I12/I14 → ServiceRequest (referral).

Golden files, the order lifecycle on one ServiceRequest, results attaching to the order, located errors
(synthetic data only)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConversionError, MessageRejected
from engine.hl7 import parse
from tests.transforms.conftest import (
    assert_golden,
    golden_settings,
    load,
    resources,
    validate_resources,
)
from transforms.convert import _convert

ORDER_KEY = "ServiceRequest?identifier=urn:oid:2.16.840.1.113883.19.999.7|PLC2001"
REFERRAL_KEY = "ServiceRequest?identifier=urn:oid:2.16.840.1.113883.19.999.20|RF-1001"
GOLDEN = ["orm_o01", "orm_o01_cancel", "oml_o21", "omg_o19", "oul_r22", "ref_i12", "ref_i14"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {
        "bundle": result.bundle,
        "guards": [list(g) for g in result.guards],
        "events": dict(result.events),
        "requires": list(result.requires),
        "warnings": list(result.warnings),
    }
    assert_golden(name, got)


def _one(bundle: dict[str, Any], rtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]
    return entry, entry["resource"]


def _spm(bundle: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one Specimen made from an SPM (its SPM-2 ids typed PLAC/FILL), not the OBR's (IG OBR[Specimen])."""
    (entry,) = [
        e
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Specimen"
        and any("type" in i for i in e["resource"].get("identifier", ()))
    ]
    return entry, entry["resource"]


def _with(name: str, old: str, new: str) -> Any:
    text = load(name).text
    assert old in text
    return parse(text.replace(old, new))


def _ref(bundle: dict[str, Any], full_url: str) -> dict[str, Any]:
    for e in bundle["entry"]:
        if e["fullUrl"] == full_url:
            return dict(e["resource"])
    raise KeyError(full_url)


# ----------------------------------------------------------------------------- ORM / OML / OMG
def test_new_order_maps_orc_obr_and_its_group() -> None:
    b = _convert(load("orm_o01"), golden_settings()).bundle
    entry, sr = _one(b, "ServiceRequest")
    # a conditional update keyed on the placer order number (the order message owns the order)
    assert entry["request"] == {"method": "PUT", "url": ORDER_KEY}
    assert sr["status"] == "active" and sr["intent"] == "order" and sr["priority"] == "routine"
    assert sr["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "24331-1",
        "display": "Lipid panel - Serum or Plasma",
    }
    assert sr["requisition"]["value"] == "GRP300"
    assert sr["authoredOn"] == "2025-04-01T10:15:00-07:00"  # ORC-9 in the site's zone (no offset sent)
    assert sr["occurrenceDateTime"] == "2025-04-02T08:00:00-07:00"  # ORC-7 TQ start
    assert sr["locationCode"][0]["coding"][1]["code"] == "OF"  # ORC-29 O → outpatient facility
    assert sr["note"] == [{"text": "Patient fasting since midnight"}]
    assert sr["subject"]["reference"] == _one(b, "Patient")[0]["fullUrl"]
    assert sr["encounter"]["reference"] == _one(b, "Encounter")[0]["fullUrl"]
    assert _ref(b, sr["requester"]["reference"])["resourceType"] == "Practitioner"
    # DG1 → Condition reason, OBX → supporting Observation, AL1 → AllergyIntolerance
    cond_entry, _cond = _one(b, "Condition")
    assert sr["reasonReference"] == [{"reference": cond_entry["fullUrl"]}]
    obs_entry, obs = _one(b, "Observation")
    assert sr["supportingInfo"] == [{"reference": obs_entry["fullUrl"]}]
    assert obs["valueQuantity"]["value"] == 72.5
    assert len(resources(b, "AllergyIntolerance")) == 1
    # Patient and Encounter are conditional creates: the ADT feed owns them
    assert _one(b, "Patient")[0]["request"]["method"] == "POST"


def test_cancel_updates_the_same_service_request() -> None:
    new = _convert(load("orm_o01"), golden_settings())
    cancel = _convert(load("orm_o01_cancel"), golden_settings())
    e1, sr1 = _one(new.bundle, "ServiceRequest")
    e2, sr2 = _one(cancel.bundle, "ServiceRequest")
    assert e1["request"] == e2["request"] == {"method": "PUT", "url": ORDER_KEY}
    assert e1["fullUrl"] == e2["fullUrl"]
    assert sr1["status"] == "active" and sr2["status"] == "revoked"
    assert sr2["code"] == sr1["code"]  # the cancel carries the OBR: the order keeps its code
    assert "authoredOn" not in sr2  # ORC-9 of a cancel is when it was cancelled, not when it was authored
    # a late resend of the new order after its cancellation goes to review instead of resurrecting it
    assert dict(cancel.guards)[ORDER_KEY] > dict(new.guards)[ORDER_KEY]


@pytest.mark.parametrize(
    ("control", "status_code", "expected"),
    [
        pytest.param("NW", "", "active", id="NW-new"),
        pytest.param("CA", "", "revoked", id="CA-cancel"),
        pytest.param("OC", "", "revoked", id="OC-cancelled"),
        pytest.param("DC", "", "revoked", id="DC-discontinue"),
        pytest.param("CA", "IP", "revoked", id="CA-wins-over-ORC5"),
        pytest.param("HD", "", "on-hold", id="HD-hold"),
        pytest.param("RL", "", "active", id="RL-release"),
        pytest.param("XO", "", "active", id="XO-change"),
        pytest.param("XO", "HD", "on-hold", id="XO-per-ORC5"),
        pytest.param("SC", "CM", "completed", id="SC-per-ORC5-CM"),
        pytest.param("SC", "IP", "active", id="SC-per-ORC5-IP"),
        pytest.param("SC", "ER", "entered-in-error", id="SC-per-ORC5-ER"),
        pytest.param("CM", "", "completed", id="CM-complete"),
        pytest.param("NW", "HD", "on-hold", id="NW-with-ORC5-HD"),
    ],
)
def test_order_control_lifecycle_on_one_resource(control: str, status_code: str, expected: str) -> None:
    m = _with("orm_o01", "ORC|NW|PLC2001", f"ORC|{control}|PLC2001")
    if status_code:
        m = parse(
            m.text.replace(
                "GRP300^SYNEHR^2.16.840.1.113883.19.999.7^ISO|",
                f"GRP300^SYNEHR^2.16.840.1.113883.19.999.7^ISO|{status_code}",
            )
        )
    result = _convert(m, golden_settings())
    entry, sr = _one(result.bundle, "ServiceRequest")
    assert entry["request"] == {"method": "PUT", "url": ORDER_KEY}
    assert sr["status"] == expected
    validate_resources(result.bundle)


def test_status_change_without_status_is_a_located_warning() -> None:
    result = _convert(_with("orm_o01", "ORC|NW|PLC2001", "ORC|SC|PLC2001"), golden_settings())
    assert _one(result.bundle, "ServiceRequest")[1]["status"] == "active"
    assert any(w.startswith("ORC-5") and "SC" in w for w in result.warnings)


def test_results_attach_to_the_order() -> None:
    """The ORU result for an order is basedOn the same ServiceRequest (same conditional URL) the ORM wrote."""
    orm = _convert(load("orm_o01"), golden_settings())
    oru = parse(
        "MSH|^~\\&|SYNLAB|SYNTH LAB^2.16.840.1.113883.19.999.2^ISO|SYNEHR|SYNTH CLINIC|20250402120000||ORU^R01^ORU_R01"
        "|ORU9|P|2.5.1\r"
        "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F\r"
        "ORC|RE|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|FIL7001^SYNLAB^2.16.840.1.113883.19.999.2^ISO\r"
        "OBR|1|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|FIL7001^SYNLAB^2.16.840.1.113883.19.999.2^ISO"
        "|24331-1^Lipid panel - Serum or Plasma^LN|||20250402080000||||||||||||||20250402115500|||F\r"
        "OBX|1|NM|2093-3^Cholesterol^LN||180|mg/dL|||||F\r"
    )
    res = _convert(oru, golden_settings())
    entry, _sr = _one(res.bundle, "ServiceRequest")
    assert entry["request"]["ifNoneExist"] == ORDER_KEY.split("?", 1)[1]
    assert entry["fullUrl"] == _one(orm.bundle, "ServiceRequest")[0]["fullUrl"]


def test_oml_specimen_and_timing() -> None:
    b = _convert(load("oml_o21"), golden_settings()).bundle
    sr_entry, sr = _one(b, "ServiceRequest")
    sp_entry, sp = _spm(b)
    # the SPM's Specimen, then the IG's OBR[Specimen] (OML_O21: for each order detail, beside the SPMs)
    assert sr["specimen"][0] == {"reference": sp_entry["fullUrl"]} and len(sr["specimen"]) == 2
    obr_sp = _ref(b, sr["specimen"][1]["reference"])
    assert obr_sp["accessionIdentifier"]["value"] == "PLC2002"  # OBR-2
    assert obr_sp["collection"] == {"collectedDateTime": "2025-04-02T08:00:00-07:00"}  # OBR-7
    assert sp["request"] == [{"reference": sr_entry["fullUrl"]}]
    # keyed on the filler's specimen id (SPM-2.2)
    assert sp_entry["request"] == {
        "method": "PUT",
        "url": "Specimen?identifier=urn:oid:2.16.840.1.113883.19.999.9|SF-100",
    }
    assert sp["type"]["coding"][0]["code"] == "119364003"
    assert sp["collection"]["collectedDateTime"] == "2025-04-02T08:15:00-07:00"
    assert sp["receivedTime"] == "2025-04-02T09:00:00-07:00"
    assert sp["collection"]["quantity"]["value"] == 5 and sp["collection"]["quantity"]["code"] == "mL"
    assert sp["collection"]["method"]["coding"][0]["code"] == "VENIP"
    assert sp["status"] == "available"
    assert sp["accessionIdentifier"]["value"] == "ACC-555"
    assert sp["container"][0]["type"]["coding"][0]["code"] == "SST"
    assert sp["condition"][0]["coding"][0]["code"] == "ROOM"
    # TQ1: priority S → stat, repeat pattern → occurrenceTiming bounded by TQ1-7/8
    assert sr["priority"] == "stat"
    assert sr["occurrenceTiming"]["code"]["coding"][0]["code"] == "Once"
    assert sr["occurrenceTiming"]["repeat"]["boundsPeriod"] == {
        "start": "2025-04-02T08:00:00-07:00",
        "end": "2025-04-02T10:00:00-07:00",
    }
    # the specimen's OBX is an Observation of that specimen, supporting the order
    obs_entry, obs = _one(b, "Observation")
    assert obs["specimen"] == {"reference": sp_entry["fullUrl"]}
    assert {"reference": obs_entry["fullUrl"]} in sr["supportingInfo"]


def test_omg_orc5_status_and_the_obr_specimen() -> None:
    b = _convert(load("omg_o19"), golden_settings()).bundle
    entry, sr = _one(b, "ServiceRequest")
    assert sr["status"] == "on-hold" and sr["code"]["coding"][0]["code"] == "24627-2"
    # no SPM: the IG's OBR[Specimen] (OBR-7 → collection time), keyed by the order, requested by it
    sp_entry, sp = _one(b, "Specimen")
    assert sr["specimen"] == [{"reference": sp_entry["fullUrl"]}] and sp["request"] == [
        {"reference": entry["fullUrl"]}
    ]
    assert sp["collection"] == {"collectedDateTime": "2025-04-03T09:00:00-07:00"}


def test_spm_codes_without_a_system_are_from_the_fields_table() -> None:
    m = _with("oml_o21", "119364003^Serum specimen^SCT", "SER^Serum")
    m = parse(
        m.text.replace("VENIP^Venipuncture^HL70488", "VENIP").replace("ROOM^Room temperature^HL70493", "ROOM")
    )
    _e, sp = _spm(_convert(m, golden_settings()).bundle)
    assert sp["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0487",
        "code": "SER",
        "display": "Serum",
    }
    assert sp["collection"]["method"]["coding"][0]["system"].endswith("v2-0488")
    assert sp["condition"][0]["coding"][0]["system"].endswith("v2-0493")


def test_spm_parent_and_a_repeated_filler_id() -> None:
    second = "SPM|2|SP-101&SYNEHR&2.16.840.1.113883.19.999.8&ISO^SF-100&SYNLAB&2.16.840.1.113883.19.999.9&ISO|SP-000&SYNEHR&2.16.840.1.113883.19.999.8&ISO"
    m = parse(load("oml_o21").text.rstrip("\r") + "\r" + second + "\r")
    result = _convert(m, golden_settings())
    specs = resources(result.bundle, "Specimen")
    # the two SPMs stay two Specimens (keyed apart, with a located warning); the parent is made sure to exist;
    # the OBR's own (IG OBR[Specimen])
    assert len(specs) == 4
    assert result.events.get("specimen_duplicate_id") == 1 and result.warnings[0].startswith("SPM(2)-2")
    parent = next(
        e
        for e in result.bundle["entry"]
        if e["resource"]["resourceType"] == "Specimen" and e["request"]["method"] == "POST"
    )
    assert parent["request"]["ifNoneExist"] == "identifier=urn:oid:2.16.840.1.113883.19.999.8|SP-000"
    child = next(s for s in specs if any(i["value"] == "SP-101" for i in s["identifier"]))
    assert child["parent"] == [{"reference": parent["fullUrl"]}]


def test_second_obr_with_the_same_number_is_kept_apart() -> None:
    m = parse(
        load("omg_o19").text.rstrip("\r")
        + "\rOBR|2|PLC2003^SYNEHR^2.16.840.1.113883.19.999.7^ISO||71250^CT thorax^C4\r"
    )
    result = _convert(m, golden_settings())
    srs = resources(result.bundle, "ServiceRequest")
    assert [s["code"]["coding"][0]["code"] for s in srs] == ["24627-2", "71250"]
    assert result.events.get("order_duplicate_number") == 1
    assert result.warnings[0].startswith("OBR(2)-2: another order group")


def test_explicit_null_removes_the_element() -> None:
    _e, sr = _one(
        _convert(_with("orm_o01", "|R|20250402080000|", '|""|20250402080000|'), golden_settings()).bundle,
        "ServiceRequest",
    )
    assert sr["priority"] == "routine"  # ORC-7.6 still says R
    m = _with("orm_o01", "||20250401101500|||1234567893", '||""|||1234567893')
    _e, sr = _one(_convert(m, golden_settings()).bundle, "ServiceRequest")
    assert "authoredOn" not in sr


@pytest.mark.parametrize(
    ("old", "new", "where", "code"),
    [
        pytest.param(
            "ORC|NW|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|",
            "ORC|NW||",
            "ORC-2",
            "101",
            id="no-order-number",
        ),
        pytest.param(
            "||20250401101500|||1234567893", "||20251301101500|||1234567893", "ORC-9", "102", id="bad-date"
        ),
    ],
)
def test_located_errors(old: str, new: str, where: str, code: str) -> None:
    m = _with("orm_o01", old, new)
    if where == "ORC-2":
        m = parse(m.text.replace("OBR|1|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|", "OBR|1||"))
    with pytest.raises(ConversionError) as err:
        _convert(m, golden_settings(strictness="strict"))
    assert str(err.value.location) == where and err.value.hl7_error == code
    if code == "102":  # a bad value in a non-key field: left out under strictness lenient (the default)
        r = _convert(m, golden_settings())
        assert r.warning_kinds[0] == "field_dropped" and r.warnings[0].startswith(where)
    else:  # no order number and no placer group number (ORC-4) either: rejected in both modes
        m = parse(m.text.replace("GRP300^SYNEHR^2.16.840.1.113883.19.999.7^ISO", ""))
        with pytest.raises(ConversionError) as err:
            _convert(m, golden_settings())
        assert str(err.value.location) == where and err.value.hl7_error == code


def test_order_without_pid_or_orc_and_unknown_trigger() -> None:
    text = load("orm_o01").text
    no_pid = parse("\r".join(s for s in text.split("\r") if not s.startswith("PID")))
    with pytest.raises(ConversionError) as err:
        _convert(no_pid, golden_settings())
    assert str(err.value.location).startswith("PID")
    no_order = parse("\r".join(s for s in text.split("\r") if not s.startswith(("ORC", "OBR"))))
    with pytest.raises(ConversionError) as err:
        _convert(no_order, golden_settings())
    assert str(err.value.location).startswith("ORC")
    with pytest.raises(MessageRejected) as rej:
        _convert(parse(text.replace("ORM^O01^ORM_O01", "ORM^O02")), golden_settings())
    assert rej.value.hl7_error == "201" or getattr(rej.value, "code", "") == "201"


# ----------------------------------------------------------------------------- OUL
def test_oul_specimen_report_and_observations() -> None:
    b = _convert(load("oul_r22"), golden_settings()).bundle
    sp_entry, _sp = _one(b, "Specimen")
    _dr_entry, dr = _one(b, "DiagnosticReport")
    assert dr["specimen"] == [{"reference": sp_entry["fullUrl"]}]
    assert dr["status"] == "final" and dr["code"]["coding"][0]["code"] == "2345-7"
    obs = resources(b, "Observation")
    assert len(obs) == 2 and all(o["specimen"] == {"reference": sp_entry["fullUrl"]} for o in obs)
    glucose = next(o for o in obs if o["code"]["coding"][0]["code"] == "2345-7")
    assert glucose["valueQuantity"]["value"] == 95 and glucose["note"][0]["text"] == "Fasting specimen"
    assert {"reference": next(e["fullUrl"] for e in b["entry"] if e["resource"] is glucose)} in dr["result"]
    # the ORC after the OBR (OUL order) names the same order as the ORM: its ServiceRequest, by placer
    sr_entry, sr = _one(b, "ServiceRequest")
    assert sr_entry["request"]["ifNoneExist"] == "identifier=urn:oid:2.16.840.1.113883.19.999.7|PLC2002"
    assert sr["specimen"] == [{"reference": sp_entry["fullUrl"]}]
    assert dr["basedOn"] == [{"reference": sr_entry["fullUrl"]}]


def test_oul_correction_updates_the_same_observation() -> None:
    first = _convert(load("oul_r22"), golden_settings())
    fixed = _convert(
        _with(
            "oul_r22",
            "||95|mg/dL^milligram per deciliter^UCUM|70-99|N|||F",
            "||96|mg/dL^milligram per deciliter^UCUM|70-99|N|||C",
        ),
        golden_settings(),
    )

    def urls(bundle: dict[str, Any]) -> list[str]:
        return [
            e["request"]["url"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
        ]

    assert urls(first.bundle) == urls(fixed.bundle)
    obs = [o for o in resources(fixed.bundle, "Observation") if o["code"]["coding"][0]["code"] == "2345-7"]
    assert obs[0]["status"] == "corrected"


_OUL_MSH = "MSH|^~\\&|SYNLAB|SYNTH LAB^2.16.840.1.113883.19.999.2^ISO|SYNEHR|SYNTH CLINIC|20250402120000||OUL^{}|C9|P|2.5.1"
_OUL_PID = "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F"
_OUL_SPM = "SPM|1|SP-300&SYNEHR&2.16.840.1.113883.19.999.8&ISO||119364003^Serum specimen^SCT|||||||||||||20250402081500"
_OUL_SPM_OBX = "OBX|1|CWE|33882-2^Specimen appearance^LN||CLEAR^Clear^L||||||F"
_OUL_SAC = "SAC|||CT-300^SYNLAB"


def _oul_obr(n: int, code: str) -> str:
    return (
        f"OBR|{n}||FIL70{n}^SYNLAB^2.16.840.1.113883.19.999.2^ISO|{code}|||20250402081500||||||||||||||||||F"
    )


def _oul_result(code: str, value: str) -> str:
    return f"OBX|1|NM|{code}||{value}|mg/dL^mg/dL^UCUM|||||F"


def _by_code(bundle: dict[str, Any], rtype: str, code: str) -> tuple[str, dict[str, Any]]:
    return next(
        (e["fullUrl"], e["resource"])
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == rtype and e["resource"]["code"]["coding"][0]["code"] == code
    )


def test_oul_r23_orders_under_a_container_report_on_the_group_specimen() -> None:
    """OUL_R23: SPECIMEN (SPM, its OBX) > CONTAINER (SAC) > ORDER (OBR, ORC, RESULT OBX)."""
    glucose = "2345-7^Glucose^LN"
    text = "\r".join(
        [_OUL_MSH.format("R23^OUL_R23"), _OUL_PID, _OUL_SPM, _OUL_SPM_OBX, _OUL_SAC, _oul_obr(1, glucose),
         "ORC|SC||FIL701^SYNLAB^2.16.840.1.113883.19.999.2^ISO||CM", _oul_result(glucose, "95")]
    )  # fmt: skip
    b = _convert(parse(text + "\r"), golden_settings()).bundle
    validate_resources(b)
    sp_url = _one(b, "Specimen")[0]["fullUrl"]
    _, dr = _one(b, "DiagnosticReport")
    result_url, result = _by_code(b, "Observation", "2345-7")
    _, appearance = _by_code(b, "Observation", "33882-2")
    assert dr["specimen"] == [{"reference": sp_url}] and dr["result"] == [{"reference": result_url}]
    assert result["specimen"] == appearance["specimen"] == {"reference": sp_url}


def test_oul_r24_order_first_with_its_specimen_and_results() -> None:
    """OUL_R24: ORDER (OBR, ORC) > SPECIMEN (SPM, its own OBX, CONTAINER SAC) then the order's RESULT OBXs; a
    second ORDER without a specimen group."""
    glucose, sodium = "2345-7^Glucose^LN", "2951-2^Sodium^LN"
    text = "\r".join(
        [_OUL_MSH.format("R24^OUL_R24"), _OUL_PID,
         _oul_obr(1, glucose), "ORC|SC||FIL701^SYNLAB^2.16.840.1.113883.19.999.2^ISO||CM",
         _OUL_SPM, _OUL_SPM_OBX, _OUL_SAC, _oul_result(glucose, "95"),
         _oul_obr(2, sodium), _oul_result(sodium, "140")]
    )  # fmt: skip
    b = _convert(parse(text + "\r"), golden_settings()).bundle
    validate_resources(b)
    sp_url = _spm(b)[0]["fullUrl"]  # the second order's OBR-7 makes an OBR[Specimen] of its own, as in ORU
    glucose_url, glucose_obs = _by_code(b, "Observation", "2345-7")
    sodium_url, sodium_obs = _by_code(b, "Observation", "2951-2")
    _, appearance = _by_code(b, "Observation", "33882-2")
    _, dr1 = _by_code(b, "DiagnosticReport", "2345-7")
    _, dr2 = _by_code(b, "DiagnosticReport", "2951-2")
    assert dr1["specimen"] == [{"reference": sp_url}] and dr1["result"] == [{"reference": glucose_url}]
    assert glucose_obs["specimen"] == appearance["specimen"] == {"reference": sp_url}
    assert dr2["result"] == [{"reference": sodium_url}]
    assert sodium_obs.get("specimen") != {"reference": sp_url}  # not the first order's specimen
    # the specimen's own OBX is not a result of the order
    assert all(r["reference"] != sp_url for r in dr1["result"]) and len(resources(b, "Observation")) == 3


def test_a_coded_specimen_description_is_text_not_the_encoded_string() -> None:
    """SPM-14 is ST; a sender's CWE there (``LA^LEFT ARM^L``) becomes the note's text without the encoding."""
    spm = "SPM|1|SP-301&SYNEHR&2.16.840.1.113883.19.999.8&ISO||119364003^Serum^SCT||||||||||LA^LEFT ARM^L~Hemolysed"
    text = "\r".join([_OUL_MSH.format("R22^OUL_R22"), _OUL_PID, spm, _oul_obr(1, "2345-7^Glucose^LN")])
    b = _convert(parse(text + "\r"), golden_settings()).bundle
    validate_resources(b)
    assert _spm(b)[1]["note"] == [{"text": "LA LEFT ARM L\nHemolysed"}]


def test_the_collectors_comment_is_the_cwe_text_not_the_encoded_value() -> None:
    """OBR-39 (CWE) → the OBR's Specimen note: each repetition's text, never ``code^text``."""
    obr = _oul_obr(1, "2345-7^Glucose^LN") + "||||||||||||||C12^Tube underfilled~C13^^^^^^^^Hemolysed sample"
    text = "\r".join([_OUL_MSH.format("R24^OUL_R24"), _OUL_PID, obr, _oul_result("2345-7^Glucose^LN", "95")])
    b = _convert(parse(text + "\r"), golden_settings()).bundle
    validate_resources(b)
    (note,) = [s["note"] for s in resources(b, "Specimen") if "note" in s]
    assert note == [{"text": "Tube underfilled\nHemolysed sample"}]


def test_oml_o33_specimen_first_orders_take_their_groups_specimen() -> None:
    """OML_O33: SPECIMEN (SPM, its OBX, SAC) > ORDER (ORC, OBR); two orders under one specimen, a third under
    the next."""
    msh = "MSH|^~\\&|SYNEHR|SYNTH CLINIC|SYNLAB|SYNTH LAB|20250402080000||OML^O33^OML_O33|C33|P|2.5.1"
    spm1 = "SPM|1|SP-401&SYNEHR&2.16.840.1.113883.19.999.8&ISO||119364003^Serum^SCT"
    spm2 = "SPM|2|SP-402&SYNEHR&2.16.840.1.113883.19.999.8&ISO||119297000^Blood^SCT"

    def order(n: int, code: str) -> list[str]:
        placer = f"PLC40{n}^SYNEHR^2.16.840.1.113883.19.999.7^ISO"
        return [f"ORC|NW|{placer}||||||||20250402080000", f"OBR|1|{placer}||{code}"]

    text = "\r".join(
        [msh, _OUL_PID, spm1, _OUL_SPM_OBX, _OUL_SAC, *order(1, "2345-7^Glucose^LN"), *order(2, "2951-2^Sodium^LN"),
         spm2, *order(3, "718-7^Hemoglobin^LN")]
    )  # fmt: skip
    b = _convert(parse(text + "\r"), golden_settings()).bundle
    validate_resources(b)
    by_id = {
        i["value"]: e["fullUrl"]
        for e in b["entry"]
        if e["resource"]["resourceType"] == "Specimen"
        for i in e["resource"].get("identifier", ())
    }
    spec = {
        sr["code"]["coding"][0]["code"]: [s["reference"] for s in sr["specimen"]]
        for sr in resources(b, "ServiceRequest")
    }
    assert by_id["SP-401"] in spec["2345-7"] and by_id["SP-401"] in spec["2951-2"]
    assert by_id["SP-402"] in spec["718-7"] and by_id["SP-401"] not in spec["718-7"]
    (appearance,) = [o for o in resources(b, "Observation") if o["code"]["coding"][0]["code"] == "33882-2"]
    assert appearance["specimen"] == {"reference": by_id["SP-401"]}


# ----------------------------------------------------------------------------- REF
def test_referral_maps_rf1_and_providers() -> None:
    b = _convert(load("ref_i12"), golden_settings()).bundle
    entry, sr = _one(b, "ServiceRequest")
    assert entry["request"] == {"method": "PUT", "url": REFERRAL_KEY}
    assert sr["status"] == "active" and sr["intent"] == "order" and sr["priority"] == "routine"
    assert sr["category"][0]["coding"][0]["code"] == "3457005"
    assert sr["code"]["coding"][0]["code"] == "Med"
    assert sr["reasonCode"][0]["coding"][0]["code"] == "S"
    assert sr["occurrencePeriod"] == {"start": "2025-04-01", "end": "2025-07-01"}
    assert [i["value"] for i in sr["identifier"]] == ["RF-1001", "EXT-77"]
    requester = _ref(b, sr["requester"]["reference"])
    assert requester["identifier"][0] == {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}
    (performer,) = sr["performer"]
    assert _ref(b, performer["reference"])["name"][0]["family"] == "Specialist"
    assert sr["reasonReference"] == [{"reference": _one(b, "Condition")[0]["fullUrl"]}]
    assert sr["note"] == [{"text": "Please see within 2 weeks"}]


def test_referral_cancel_updates_the_same_service_request() -> None:
    new = _convert(load("ref_i12"), golden_settings())
    cancel = _convert(load("ref_i14"), golden_settings())
    e1, sr1 = _one(new.bundle, "ServiceRequest")
    e2, sr2 = _one(cancel.bundle, "ServiceRequest")
    assert e1["request"] == e2["request"] and e1["fullUrl"] == e2["fullUrl"]
    assert sr1["status"] == "active" and sr2["status"] == "revoked"
    assert dict(cancel.guards)[REFERRAL_KEY] > dict(new.guards)[REFERRAL_KEY]


def test_referral_errors_are_located() -> None:
    text = load("ref_i12").text
    with pytest.raises(ConversionError) as err:
        _convert(
            parse(
                text.replace("|RF-1001^SYNREF^2.16.840.1.113883.19.999.20^ISO|", "||").replace(
                    "|EXT-77^SPEC", "|"
                )
            ),
            golden_settings(),
        )
    assert str(err.value.location).startswith("RF1-6")
    with pytest.raises(ConversionError) as err:
        _convert(parse("\r".join(s for s in text.split("\r") if not s.startswith("RF1"))), golden_settings())
    assert str(err.value.location).startswith("RF1")
    with pytest.raises(MessageRejected):
        _convert(parse(text.replace("REF^I12^REF_I12", "REF^I15^REF_I15")), golden_settings())


def test_oru_spm_becomes_the_reports_specimen() -> None:
    """ORU^R01's SPECIMEN group (SPM) is no longer dropped: Specimen, DiagnosticReport.specimen, Observation.specimen;
    without SPM the OBR's specimen is keyed by the order, the same Specimen the order message wrote."""
    head = (
        "MSH|^~\\&|SYNLAB|SYNTH LAB^2.16.840.1.113883.19.999.2^ISO|SYNEHR|SYNTH CLINIC|20250402120000||ORU^R01^ORU_R01"
        "|ORU8|P|2.5.1\r"
        "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F\r"
        "OBR|1|PLC2003^SYNEHR^2.16.840.1.113883.19.999.7^ISO|FIL7003^SYNLAB^2.16.840.1.113883.19.999.2^ISO"
        "|24627-2^Chest CT^LN|||20250403090000||||||||||||||20250403120000|||F\r"
        "OBX|1|TX|24627-2^Chest CT^LN||No acute findings||||||F\r"
    )
    b = _convert(
        parse(head + "SPM|1|^SF-300&SYNLAB&2.16.840.1.113883.19.999.9&ISO||119364003^Serum^SCT\r"),
        golden_settings(),
    ).bundle
    sp_entry, sp = _spm(b)
    assert sp["type"]["coding"][0]["code"] == "119364003"
    # the SPM's Specimen, then the OBR's (IG ORU_R01: OBR[Specimen] beside the SPMs)
    dr_specimens = _one(b, "DiagnosticReport")[1]["specimen"]
    assert dr_specimens[0] == {"reference": sp_entry["fullUrl"]} and len(dr_specimens) == 2
    assert _one(b, "Observation")[1]["specimen"] == {"reference": sp_entry["fullUrl"]}
    # no SPM: OBR[Specimen], the same resource the OMG^O19 for this order wrote
    b = _convert(parse(head), golden_settings()).bundle
    order_msg = _convert(load("omg_o19"), golden_settings()).bundle
    assert _one(b, "Specimen")[0]["request"] == _one(order_msg, "Specimen")[0]["request"]


def test_prt_ordering_provider_is_the_requester_without_orc12() -> None:
    """IG OML_O21 ORDER.PRT: PRT-4 OP (HL70443) → requester when ORC-12 and OBR-16 name nobody."""
    text = load("oml_o21").text.replace("|||1234567893^Carer^Casey^^^Dr^^^NPI\r", "|||\r", 1)
    text = text.replace(
        "\rTQ1|", "\rPRT|1|AD||OP^Ordering Provider^HL70443|1992000007^Prescriber^Pat^^^Dr^^^NPI\rTQ1|", 1
    )
    b = _convert(parse(text), golden_settings()).bundle
    _e, sr = _one(b, "ServiceRequest")
    assert _ref(b, sr["requester"]["reference"])["identifier"][0]["value"] == "1992000007"


def test_spm_accession_and_other_ids_are_cx() -> None:
    """SPM-30 accession id and SPM-31 other specimen ids are CX (v2.7+): the system from CX-4, the type from
    CX-5 (table 0203)."""
    old = "ACC-555^^^SYNLAB&2.16.840.1.113883.19.999.9&ISO"
    new = old + "^ACSN|OSI-1^^^SYNLAB&2.16.840.1.113883.19.999.9&ISO^PI~OSI-2"
    _e, sp = _spm(_convert(_with("oml_o21", old, new), golden_settings()).bundle)
    assert sp["accessionIdentifier"]["system"] == "urn:oid:2.16.840.1.113883.19.999.9"
    assert sp["accessionIdentifier"]["type"]["coding"][0]["code"] == "ACSN"
    other = [i for i in sp["identifier"] if i["value"].startswith("OSI")]
    assert other[0]["system"] == "urn:oid:2.16.840.1.113883.19.999.9"
    assert other[0]["type"]["coding"][0]["code"] == "PI"
    assert other[1] == {"value": "OSI-2"}


def test_oul_order_timing_from_its_tq1() -> None:
    """OUL^R22: the order's TQ1 (after its OBR / ORC) gives the ServiceRequest's timing, as in ORU."""
    text = load("oul_r22").text
    obr_at = text.index("\rOBR|")
    end = text.index("\r", obr_at + 1)
    m = parse(
        text[:end] + "\rTQ1|1||Q4H&Every 4 hours&HL70335||||20250402080000|20250403080000|R" + text[end:]
    )
    (sr,) = resources(_convert(m, golden_settings()).bundle, "ServiceRequest")
    assert sr["occurrenceTiming"]["code"]["coding"][0]["code"] == "Q4H" and sr["priority"] == "routine"


@pytest.mark.parametrize(
    ("old", "new", "where", "start"),
    [
        pytest.param(  # TQ1-8 a day before TQ1-7 (no repeat pattern: occurrencePeriod)
            "\rOBR|",
            "\rTQ1|1||||||20250402080000|20250401080000|R\rOBR|",
            "TQ1-8",
            "2025-04-02T08:00:00-07:00",
            id="tq1",
        ),
        pytest.param(  # ORC-7.5 before ORC-7.4 (TQ of v2.3)
            "|1^^^20250402080000^^R|",
            "|1^^^20250402080000^20250402070000^R|",
            "ORC-7.5",
            "2025-04-02T08:00:00-07:00",
            id="orc-7",
        ),
    ],
)
def test_an_order_end_before_its_start_keeps_the_start_with_a_warning(
    old: str, new: str, where: str, start: str
) -> None:
    """FHIR per-1: the ServiceRequest's occurrencePeriod cannot end before it starts (the models do not check
    it): the start is kept as occurrenceDateTime, the end dropped with a located warning."""
    r = _convert(_with("orm_o01", old, new), golden_settings())
    validate_resources(r.bundle)
    (sr,) = resources(r.bundle, "ServiceRequest")
    assert sr["occurrenceDateTime"] == start and "occurrencePeriod" not in sr
    assert list(r.warning_kinds) == ["order_end_before_start"]
    assert r.warnings[0].startswith(where + ":")


def test_pid21_mother_is_a_related_person_in_orders_and_results() -> None:
    """IG PID[Patient]: PID-21 mother's identifier → RelatedPerson (relationship MTH), in an order (ORM) and in a
    result (ORU) as in ADT, DFT and SIU."""
    pid = "F|||12 Example Way^^Springfield^ZZ^00000^USA^H"
    mother = pid + "|" * 10 + "MOM900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO"
    for name in ("orm_o01", "oru_r01_multi"):
        text = load(name).text
        assert pid in text, name
        b = _convert(parse(text.replace(pid, mother, 1)), golden_settings()).bundle
        (rp,) = [
            r
            for r in resources(b, "RelatedPerson")
            if any(i["value"] == "MOM900001" for i in r.get("identifier", ()))
        ]
        assert rp["relationship"][0]["coding"][0]["code"] == "MTH", name


# ----------------------------------------------------------------------------- keyed by requisition (ORC-4)
_NO_NUMBERS = [
    ("ORC|NW|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|", "ORC|NW||"),
    ("OBR|1|PLC2001^SYNEHR^2.16.840.1.113883.19.999.7^ISO|", "OBR|1||"),
]
_REQ_ORC = "ORC|RE|||GRP300^SYNEHR^2.16.840.1.113883.19.999.7^ISO"


def _without_numbers(name: str, *more: tuple[str, str]) -> Any:
    text = load(name).text
    control = "ORC|CA" if name.endswith("cancel") else "ORC|NW"
    for old, new in [*_NO_NUMBERS, *more]:
        text = text.replace(old.replace("ORC|NW", control), new.replace("ORC|NW", control))
    assert "PLC2001" not in text
    return parse(text)


def test_order_without_numbers_is_keyed_by_requisition_and_code() -> None:
    """ORC-2/3 and OBR-2/3 empty, ORC-4 valued: the ServiceRequest is keyed by the requisition + OBR-4, keeps the
    requisition, and the message carries the located warning (lenient, the default)."""
    r = _convert(_without_numbers("orm_o01"), golden_settings())
    validate_resources(r.bundle)
    entry, sr = _one(r.bundle, "ServiceRequest")
    assert entry["request"]["method"] == "PUT"
    assert entry["request"]["url"].startswith("ServiceRequest?identifier=urn:sluice:key|")
    assert sr["requisition"]["value"] == "GRP300"
    assert sr["requisition"]["system"] == "urn:oid:2.16.840.1.113883.19.999.7"
    assert sr["requisition"]["type"]["coding"][0]["code"] == "PGN"
    assert sr["code"]["coding"][0]["code"] == "24331-1"
    assert r.warning_kinds.count("order_keyed_by_requisition") == 1
    (w,) = [w for w, k in zip(r.warnings, r.warning_kinds, strict=True) if k == "order_keyed_by_requisition"]
    assert w.startswith("ORC-2:") and "ORC-4" in w and "OBR-4" in w and "GRP300" not in w


def test_requisition_keyed_order_lifecycle_updates_one_service_request() -> None:
    """NW then CA for the same requisition and test: one ServiceRequest, active then revoked (guarded)."""
    new = _convert(_without_numbers("orm_o01"), golden_settings())
    cancel = _convert(_without_numbers("orm_o01_cancel"), golden_settings())
    e1, sr1 = _one(new.bundle, "ServiceRequest")
    e2, sr2 = _one(cancel.bundle, "ServiceRequest")
    assert e1["request"] == e2["request"] and e1["fullUrl"] == e2["fullUrl"]
    assert sr1["status"] == "active" and sr2["status"] == "revoked"
    key = e1["request"]["url"]
    assert dict(cancel.guards)[key] > dict(new.guards)[key]
    # another test under the same requisition is another ServiceRequest
    other = _convert(
        _without_numbers("orm_o01", ("24331-1^Lipid panel", "2345-7^Glucose")), golden_settings()
    )
    assert _one(other.bundle, "ServiceRequest")[0]["request"] != e1["request"]
    # no OBR-4: the OBR-1 set id is the second part of the key, said in the warning
    no_code = _convert(
        _without_numbers("orm_o01", ("24331-1^Lipid panel - Serum or Plasma^LN", "")), golden_settings()
    )
    assert _one(no_code.bundle, "ServiceRequest")[0]["request"] not in (e1["request"],)
    assert any("OBR-1" in w for w in no_code.warnings)


def test_requisition_key_is_not_used_under_strict() -> None:
    """Keys stay strict: under strictness strict an order without placer/filler number is rejected as before."""
    with pytest.raises(ConversionError) as err:
        _convert(_without_numbers("orm_o01"), golden_settings(strictness="strict"))
    assert str(err.value.location) == "ORC-2" and err.value.hl7_error == "101"


def test_result_without_numbers_meets_the_requisition_keyed_order() -> None:
    """ORU with ORC-4 and no placer/filler number: the report is keyed by the requisition + code and is basedOn
    the same ServiceRequest the order message wrote."""
    orm = _convert(_without_numbers("orm_o01"), golden_settings())
    order_url = _one(orm.bundle, "ServiceRequest")[0]["request"]["url"]
    text = load("oru_r01_multi").text
    first = text.split("\rOBR|2|")[0] if "\rOBR|2|" in text else text
    first = first.replace(
        "ORC|RE|PLC1001^SYNEHR|FIL5001^SYNLAB^2.16.840.1.113883.19.999.2^ISO", _REQ_ORC
    ).replace(
        "OBR|1|PLC1001^SYNEHR|FIL5001^SYNLAB^2.16.840.1.113883.19.999.2^ISO|24323-8^Comprehensive "
        "metabolic panel^LN",
        "OBR|1|||24331-1^Lipid panel - Serum or Plasma^LN",
    )
    assert "PLC1001" not in first.split("\rOBR|2|")[0]
    oru = _convert(parse(first), golden_settings())
    validate_resources(oru.bundle)
    reports = [e for e in oru.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    (based_on,) = reports[0]["resource"]["basedOn"]
    # the same ServiceRequest (same key) the order message wrote; the result only makes sure it exists
    (sr_entry,) = [e for e in oru.bundle["entry"] if e["fullUrl"] == based_on["reference"]]
    assert sr_entry["fullUrl"] == _one(orm.bundle, "ServiceRequest")[0]["fullUrl"]
    assert sr_entry["request"]["method"] == "POST"
    assert order_url.endswith(sr_entry["request"]["ifNoneExist"].split("=", 1)[1])
    assert "order_keyed_by_requisition" in oru.warning_kinds
