"""Issue 14 end to end: orders, lab results by specimen and referrals, MLLP in → store → HL7→FHIR → Medplum.

An order sent new, then cancelled, then its new-order message resent: the server holds exactly one
ServiceRequest, revoked (the late resend is held for review), and the lab's result for that order is
``basedOn`` it.  An OML with a specimen then the OUL result for it: one Specimen, referenced by the order,
the report and its observations.  A referral then its cancellation: one ServiceRequest, revoked.  Each
series runs on the validating server and on Medplum's stock FhirRouter (synthetic data only).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_fhir_series import only, send_all, wait_delivered
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.fhirserver import FhirServer

pytestmark = pytest.mark.fhirserver

MSH = "MSH|^~\\&|ALLSCRIPTS|NORTHCLINIC|SLUICE|HOSP|{ts}||{type}|{cid}|P|2.5.1\r"
PID = "PID|1||E2E140^^^NORTHCLINIC^MR||Fixture^Robin^J||19700305|F\r"
PLACER = "ORD1400^NORTHCLINIC"


@pytest.fixture(params=["validating", "stock"])
def fhir(request: pytest.FixtureRequest) -> FhirServer:
    srv: FhirServer = request.getfixturevalue(
        "fhir_server" if request.param == "validating" else "stock_fhir_server"
    )
    srv.reset()
    return srv


def engine_for(tmp_path: Path, fhir: FhirServer) -> tuple[EngineProcess, Path]:
    port = free_port()
    channel = fhir_channel(port, "fhir", types=("ORM", "OML", "OUL", "ORU", "REF"))
    dest = {"kind": "fhir", "base_url": fhir.base_url, "retry": {"max_attempts": 5, "backoff": 0.2}}
    cfg = write_config(tmp_path, channels={"clinic": channel}, destinations={"fhir": dest})
    return EngineProcess(cfg, port), tmp_path / "sluice.db"


def orm(control: str, cid: str) -> str:
    return (
        MSH.format(ts="20250314083000", type="ORM^O01^ORM_O01", cid=cid)
        + PID
        + f"ORC|{control}|{PLACER}||||||||20250314083000|||1234567893^Carer^Casey^^^Dr^^^NPI\r"
        + f"OBR|1|{PLACER}||24331-1^Lipid panel^LN|R|20250314090000\r"
        + "DG1|1||E78.5^Hyperlipidemia^I10\r"
    )


def oru(cid: str) -> str:
    return (
        MSH.format(ts="20250314101500", type="ORU^R01^ORU_R01", cid=cid)
        + PID
        + f"ORC|RE|{PLACER}|FIL1400^NORTHLAB\r"
        + f"OBR|1|{PLACER}|FIL1400^NORTHLAB|24331-1^Lipid panel^LN|||20250314090000|||||||||||||||20250314101000|||F\r"
        + "OBX|1|NM|2093-3^Cholesterol total^LN||182|mg/dL^mg/dL^UCUM|<200||||F|||20250314100000\r"
    )


SPM = "SPM|1|SP1401&NORTHCLINIC^SF1401&NORTHLAB||119364003^Serum specimen^SCT|||||||||||||20250314090500\r"


def oml(cid: str) -> str:
    return (
        MSH.format(ts="20250314083000", type="OML^O21^OML_O21", cid=cid)
        + PID
        + "ORC|NW|ORD1401^NORTHCLINIC||||||||20250314083000\r"
        + "TQ1|1||Once||||20250314090000||S\r"
        + "OBR|1|ORD1401^NORTHCLINIC||2345-7^Glucose^LN\r"
        + SPM
    )


def oul(cid: str) -> str:
    return (
        MSH.format(ts="20250314110000", type="OUL^R22^OUL_R22", cid=cid)
        + PID
        + SPM
        + "OBR|1|ORD1401^NORTHCLINIC|FIL1401^NORTHLAB|2345-7^Glucose^LN|||20250314090500||||||||||||||20250314110000|||F\r"
        + "ORC|SC|ORD1401^NORTHCLINIC|FIL1401^NORTHLAB||CM\r"
        + "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL^mg/dL^UCUM|70-99|N|||F\r"
    )


def ref(trigger: str, cid: str) -> str:
    return (
        MSH.format(ts="20250314083000", type=f"REF^{trigger}^REF_I12", cid=cid)
        + "RF1|A|R|Med^Medical^HL70281||O|RF1400^NORTHCLINIC|20250314|20250614\r"
        + "PRD|RP|Carer^Casey^^^Dr|||||1234567893^NPI\r"
        + "PRD|RT|Special^Sam|||||SP22^LI\r"
        + PID
    )


def test_order_new_cancel_then_result(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    with eng:
        send_all(eng.port, [orm("NW", "M1"), orm("CA", "M2"), orm("NW", "M1")])  # the resend: deduped
        send_all(eng.port, [orm("NW", "M3")])  # the new order again, as a new message, after its cancel
        send_all(eng.port, [oru("M4")])
        wait_delivered(db, 3, review=1)  # NW, CA, ORU delivered; the late NW held for review
    order = only(fhir, "ServiceRequest")
    assert order["status"] == "revoked" and order["code"]["coding"][0]["code"] == "24331-1"
    assert any(i["value"] == "ORD1400" for i in order["identifier"])
    condition = only(fhir, "Condition")
    assert order["reasonReference"][0]["reference"] == f"Condition/{condition['id']}"
    report = only(fhir, "DiagnosticReport")
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    only(fhir, "Patient")


def test_lab_order_then_specimen_result(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    with eng:
        send_all(eng.port, [oml("L1"), oul("L2"), oul("L3")])  # the result sent twice (new control id)
        wait_delivered(db, 3)
    specimen = only(fhir, "Specimen")
    order = only(fhir, "ServiceRequest")
    assert order["status"] == "active" and order["priority"] == "stat"
    assert order["specimen"] == [{"reference": f"Specimen/{specimen['id']}"}]
    report = only(fhir, "DiagnosticReport")
    assert report["specimen"] == [{"reference": f"Specimen/{specimen['id']}"}]
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    obs = only(fhir, "Observation")
    assert (
        obs["specimen"] == {"reference": f"Specimen/{specimen['id']}"} and obs["valueQuantity"]["value"] == 95
    )


def test_referral_then_cancel(tmp_path: Path, fhir: FhirServer) -> None:
    eng, db = engine_for(tmp_path, fhir)
    with eng:
        send_all(eng.port, [ref("I12", "R1"), ref("I14", "R2")])
        wait_delivered(db, 2)
    referral = only(fhir, "ServiceRequest")
    assert referral["status"] == "revoked" and referral["category"][0]["coding"][0]["code"] == "3457005"
    requester = fhir.request("GET", "/" + referral["requester"]["reference"])
    assert requester["identifier"][0]["value"] == "1234567893"
    assert len(referral["performer"]) == 1
