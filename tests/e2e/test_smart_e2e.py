"""Issue 13, SMART Backend Services end to end: MLLP in → store → HL7→FHIR → fhir destination with
``auth: {type: smart-backend}`` → a bearer-protected gateway on 127.0.0.1 → the real Medplum test server.

The gateway (tests/support/smartserver.py) is the EHR's authorization server: it verifies each client assertion
against the JWKS that ``sluice keys jwks`` printed for the engine's key (signature, kid/alg, iss = sub =
client id, aud = its token URL, exp at most 5 minutes ahead, jti never seen), and forwards FHIR requests to
Medplum only with a bearer token it issued.  One token serves several messages; when the gateway revokes it,
the engine's next request gets 401, the engine fetches a new token with a fresh assertion and delivers.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine import store as st
from engine.client import MLLPClient, parse_ack
from engine.smartkeys import jwks as jwks_command
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.fhirserver import FhirServer
from tests.support.smartserver import SmartServer

CLIENT_ID = "sluice-e2e-synthetic"
KID = "sluice-e2e-1"


def adt(control_id: str, mrn: str, family: str) -> str:
    return (
        f"MSH|^~\\&|SYNTHEHR|NORTHCLINIC|SLUICE|HOSP|20250314083000||ADT^A04^ADT_A01|{control_id}|P|2.5.1\r"
        "EVN|A04|20250314083000\r"
        f"PID|1||{mrn}^^^NORTHCLINIC^MR||{family}^Robin||19700305|F\r"
        f"PV1|1|O|4N^401^A^NORTHCLINIC||||||||||||||||V{mrn}^^^NORTHCLINIC^VN\r"
    )


def send(port: int, message: str) -> None:
    import asyncio

    async def go() -> None:
        client = MLLPClient("127.0.0.1", port)
        try:
            info = parse_ack(await client.send(message.encode()))
            assert info.code == "AA", info
        finally:
            await client.close()

    asyncio.run(go())


def wait_delivered(db: Path, n: int, timeout: float = 30) -> list[Any]:
    s = st.Store(f"sqlite:///{db}")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = s.delivery_counts()
            if counts.get(("ehr", st.DELIVERED), 0) >= n or counts.get(("ehr", st.DEAD)):
                break
            time.sleep(0.05)
        return [d for m in s.list_messages() for d in s.deliveries_of(m.id)]
    finally:
        s.close()


@pytest.fixture
def gateway(tmp_path: Path, fhir_server: FhirServer) -> Iterator[SmartServer]:
    fhir_server.reset()
    key = tmp_path / "smart-ec.pem"
    # a key made the way docs/destinations.md says, by openssl
    ec = subprocess.run(
        ["openssl", "ecparam", "-name", "secp384r1", "-genkey", "-noout"], check=True, capture_output=True
    ).stdout
    key.write_bytes(
        subprocess.run(
            ["openssl", "pkcs8", "-topk8", "-nocrypt"], input=ec, check=True, capture_output=True
        ).stdout
    )
    key.chmod(0o600)
    res = CliRunner().invoke(jwks_command, ["--kid", KID, str(key)])
    assert res.exit_code == 0, res.output
    srv = SmartServer(client_id=CLIENT_ID, jwks=json.loads(res.stdout), upstream=fhir_server.base_url).start()
    yield srv
    srv.close()


def test_engine_delivers_to_medplum_with_smart_backend_token(
    tmp_path: Path, gateway: SmartServer, fhir_server: FhirServer
) -> None:
    port = free_port()
    dest = {
        "kind": "fhir",
        "base_url": gateway.fhir_url,
        "mode": "transaction",
        "auth": {
            "type": "smart-backend",
            "token_url": gateway.token_url,
            "client_id": CLIENT_ID,
            "private_key": {"file": "smart-ec.pem"},  # relative to routes.yaml
            "alg": "ES384",
            "kid": KID,
            "scope": "system/Patient.write system/Encounter.write",
        },
        "timeout": 10,
        "retry": {"max_attempts": 3, "backoff": 0.2, "max_backoff": 1},
        "on_failure": "dead-letter",
    }
    cfg = write_config(tmp_path, channels={"clinic": fhir_channel(port, "ehr")}, destinations={"ehr": dest})
    db = tmp_path / "sluice.db"
    with EngineProcess(cfg, port) as eng:
        send(eng.port, adt("SM1", "SM100", "Smarttest"))
        send(eng.port, adt("SM2", "SM200", "Smarttwo"))
        first = wait_delivered(db, 2)
        assert [d.status for d in first] == [st.DELIVERED] * 2, [(d.status, d.last_error) for d in first]
        assert gateway.issued == ["smart-tok-1"]  # one token for both messages
        gateway.valid.clear()  # the EHR revokes it: 401, a new assertion, a new token, delivered
        send(eng.port, adt("SM3", "SM300", "Smartthree"))
        after = wait_delivered(db, 3)
    assert [d.status for d in after] == [st.DELIVERED] * 3, [(d.status, d.last_error) for d in after]
    assert gateway.issued == ["smart-tok-1", "smart-tok-2"]
    assert gateway.refusals == []
    assert len({a["claims"]["jti"] for a in gateway.assertions}) == 2
    for a in gateway.assertions:
        assert a["header"] == {"alg": "ES384", "kid": KID, "typ": "JWT"}
        assert a["claims"]["iss"] == a["claims"]["sub"] == CLIENT_ID
        assert a["claims"]["aud"] == gateway.token_url
        assert 0 < a["claims"]["exp"] - a["claims"]["iat"] <= 300
    # the FHIR requests: two with token 1, one refused (revoked), then token 2
    assert gateway.fhir_auth == ["Bearer smart-tok-1"] * 3 + ["Bearer smart-tok-2"]
    families = {n.get("family") for p in fhir_server.search("Patient?_count=50") for n in p.get("name") or []}
    assert {"Smarttest", "Smarttwo", "Smartthree"} <= families
