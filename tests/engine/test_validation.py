"""``validate: structure`` (engine/validation.py): the check itself, the channel key, and a real engine."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import config as cfgmod
from engine import hl7
from engine import store as st
from engine.client import MLLPClient, parse_ack
from engine.errors import ConfigError, MessageContentError
from engine.processing import ChannelRuntime
from engine.store import ERROR, PROCESSED
from engine.validation import check_structure
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = sorted((ROOT / "tests" / "transforms" / "messages").glob("*.hl7"))
SAMPLES = sorted((ROOT / "tests" / "engine" / "samples").glob("*.hl7"))
# what fhir-to-hl7 writes (tests/transforms/test_fhir_to_v2_orders.py keeps these goldens)
WRITTEN = sorted((ROOT / "tests" / "transforms" / "expected" / "fhir_to_v2").glob("*.hl7"))

# Synthetic values that must never show up in a reason (no PHI in reasons or logs).
VALUES = ("Validatee", "MRN7731", "19611122", "Elm Street")


def adt(
    control: str = "V1", *, version: str = "2.5.1", structure: str = "ADT_A01", body: str | None = None
) -> str:
    msh = f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||ADT^A01^{structure}|{control}|P|{version}\r"
    if body is None:
        body = (
            "EVN|A01|20250314083000\r"
            "PID|1||MRN7731^^^NORTH^MR||Validatee^Alex||19611122|F|||1 Elm Street^^Springfield^OR^97477\r"
            "PV1|1|I|4N^401^A\r"
        )
    return msh + body


def failure(text: str) -> MessageContentError:
    with pytest.raises(MessageContentError) as info:
        check_structure(hl7.parse(text))
    err = info.value
    reason = str(err)
    assert reason.startswith("message structure: ")
    assert "set validate: off for this channel" in reason  # what to do
    for value in VALUES:
        assert value not in reason, f"the reason quotes message content: {reason}"
    return err


# ----------------------------------------------------------------------------- the check
@pytest.mark.parametrize("path", GOLDEN + SAMPLES + WRITTEN, ids=lambda p: p.name)
def test_the_repository_messages_have_a_valid_structure(path: Path) -> None:
    check_structure(hl7.parse(path.read_text()))


def test_a_valid_message_passes() -> None:
    check_structure(hl7.parse(adt()))
    # Z-segments are site-defined: allowed anywhere
    check_structure(hl7.parse(adt(body="EVN|A01\rZPI|1|x\rPID|1||M^^^N^MR\rPV1|1|I\rZPV|1\r")))


def test_a_missing_required_segment() -> None:
    err = failure(adt(body="EVN|A01\rPID|1||MRN7731^^^NORTH^MR||Validatee^Alex\r"))
    assert "ends before ADT_A01 (HL7 v2.5.1) is complete: after PID it needs PV1" in str(err)
    assert (err.ack_code, err.hl7_error, str(err.location)) == ("AE", "100", "PID")


def test_a_segment_out_of_order() -> None:
    err = failure(adt(body="PID|1||MRN7731^^^NORTH^MR||Validatee^Alex\rEVN|A01\rPV1|1|I\r"))
    assert "segment PID (segment 2) is out of place in ADT_A01 (HL7 v2.5.1): after MSH it needs EVN" in str(
        err
    )
    assert err.location is not None and err.location.hl7() == "PID^1"


def test_a_segment_the_structure_does_not_have() -> None:
    err = failure(adt(body="EVN|A01\rPID|1||MRN7731^^^NORTH^MR\rSCH|1|Validatee\rPV1|1|I\r"))
    assert "segment SCH (segment 4) is not part of ADT_A01 (HL7 v2.5.1)" in str(err)


def test_a_segment_repeated_beyond_its_cardinality() -> None:
    err = failure(adt(body="EVN|A01\rPID|1||MRN7731^^^NORTH^MR\rPID|2||MRN7731^^^NORTH^MR\rPV1|1|I\r"))
    assert "segment PID (segment 4) is out of place in ADT_A01" in str(err)
    assert str(err.location) == "PID(2)"


def test_groups_in_an_oru() -> None:
    ok = (
        "MSH|^~\\&|LAB|NORTH|SL|HOSP|20250314083000||ORU^R01^ORU_R01|R1|P|2.5.1\r"
        "PID|1||MRN7731^^^NORTH^MR\rPV1|1|O\rORC|RE|O1\rOBR|1|O1\rOBX|1|NM|1^A^LN||5\rNTE|1||n\r"
        "OBX|2|NM|2^B^LN||6\rOBR|2|O2\rOBX|1|NM|3^C^LN||7\r"
    )
    check_structure(hl7.parse(ok))
    err = failure(ok.replace("OBR|1|O1\r", "").replace("ORC|RE|O1\r", ""))
    assert "segment OBX (segment 4) is out of place in ORU_R01 (HL7 v2.5.1): after PV1 it needs OBR" in str(
        err
    )


def test_the_structure_comes_from_the_event_when_msh_9_3_is_missing_or_undefined() -> None:
    a04 = adt().replace("ADT^A01^ADT_A01", "ADT^A04").replace("|2.5.1\r", "|2.3\r")
    check_structure(hl7.parse(a04))  # v2.3: A04 uses the ADT_A01 structure (table 0354)
    check_structure(hl7.parse(adt(structure="ADT_A04")))  # not a v2.5.1 structure: the event's is used
    err = failure(adt(structure="ACK_N02").replace("ADT^A01", "QQQ^Z99"))
    assert "MSH-9.3 names ACK_N02, which HL7 v2.5.1 does not define" in str(err)  # a structure of v2.3
    assert str(err.location) == "MSH-9.3"
    # a value that is no structure of any version is not quoted: it may be anything a sender put there
    err = failure(adt(structure="XYZ_A99").replace("ADT^A01", "QQQ^QUORTH"))
    assert "MSH-9.3 names invalid (7 characters)" in str(err) and "XYZ" not in str(err)
    assert "QQQ^invalid (6 characters)" in str(err) and "QUORTH" not in str(err)


def test_a_version_without_definitions() -> None:
    err = failure(adt(version="2.9"))
    assert "hl7apy has no definitions for HL7 version '2.9'" in str(err)
    assert (err.hl7_error, str(err.location)) == ("203", "MSH-12")


# ----------------------------------------------------------------------------- the channel key
def _load(tmp_path: Path, **channel: Any) -> cfgmod.Config:
    port = free_port()
    path = write_config(
        tmp_path,
        channels={"c": basic_channel(port, **channel)},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    return cfgmod.load(path)


def test_the_key_defaults_to_off_and_reads_a_bare_yaml_off(tmp_path: Path) -> None:
    assert _load(tmp_path / "a").channels[0].validate == "off"
    assert _load(tmp_path / "b", validate=False).channels[0].validate == "off"  # YAML `validate: off`
    assert _load(tmp_path / "c", validate="structure").channels[0].validate == "structure"


def test_an_unknown_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, validate="fields")
    assert info.value.key == "validate" and "use one of: off, structure" in str(info.value)


def test_structure_without_hl7apy_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hl7apy", None)  # import hl7apy now raises ImportError
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, validate="structure")
    assert info.value.key == "validate"
    assert "pip install 'sluice[validate]'" in str(info.value)
    assert "channels/c.yaml" in str(info.value)


def test_the_processing_runtime_checks_after_the_filter_and_before_the_steps(tmp_path: Path) -> None:
    config = _load(tmp_path, validate="structure", filter={"field": "PV1-2", "in": ["I", ""]})
    runtime = ChannelRuntime(config, config.channels[0], store=None)
    good = adt("G1").encode()
    assert runtime.run_raw(1, good).status == PROCESSED
    bad = adt("B1", body="EVN|A01\rPID|1||MRN7731^^^NORTH^MR||Validatee^Alex\r").encode()
    result = runtime.run_raw(2, bad)
    assert result.status == ERROR
    assert "after PID it needs PV1" in result.reason and "Validatee" not in result.reason
    # a message the filter drops is not checked
    assert runtime.run_raw(3, adt("F1").replace("PV1|1|I", "PV1|1|O").encode()).status == "filtered"
    off = _load(tmp_path / "off")
    assert ChannelRuntime(off, off.channels[0], store=None).run_raw(4, bad).status == PROCESSED


# ----------------------------------------------------------------------------- a real engine
def test_through_a_real_engine(tmp_path: Path) -> None:
    """Worker processes (ack: on-commit) and the committer (ack: after-processing) both run the check."""
    port, port2 = free_port(), free_port()
    out = tmp_path / "out"
    dest = {"kind": "file", "directory": str(out), "pattern": "{control_id}.{ext}", "fsync": False}
    channels = {
        "oncommit": basic_channel(port, validate="structure"),
        "after": basic_channel(port2, validate="structure", ack="after-processing"),
    }
    cfg = write_config(tmp_path, channels=channels, destinations={"out": dest}, processing={"workers": 1})
    missing_pv1 = "EVN|A01\rPID|1||MRN7731^^^NORTH^MR||Validatee^Alex\r"

    async def send(p: int, text: str) -> bytes:
        async with MLLPClient("127.0.0.1", p) as client:
            return await client.send(text.encode())

    with EngineProcess(cfg, port):
        assert parse_ack(asyncio.run(send(port, adt("OK1")))).code == "AA"
        # on-commit: stored and ACKed first, checked in the worker process
        assert parse_ack(asyncio.run(send(port, adt("BAD1", body=missing_pv1)))).code == "AA"
        # after-processing: the ACK carries the outcome, located (ERR-2) and explained (ERR-8)
        raw_ack = asyncio.run(send(port2, adt("BAD2", body=missing_pv1)))
        ack = parse_ack(raw_ack)
        assert (ack.code, ack.error_code) == ("AE", "100")
        err = hl7.parse(raw_ack.decode()).first("ERR")
        assert err is not None and err.value(2) == "PID^1"
        assert "after PID it needs PV1" in err.value(8)
        wait_for(lambda: (out / "OK1.hl7").exists(), what="the valid message delivered")
        store = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:

            def statuses() -> dict[str, tuple[str, str]]:
                return {r.control_id: (r.status, r.reason) for r in store.list_messages()}

            rows = wait_for(
                lambda: (s := statuses()).get("BAD1", ("",))[0] == ERROR and s, what="BAD1 failed"
            )
        finally:
            store.close()
    assert rows["OK1"][0] == PROCESSED
    for cid in ("BAD1", "BAD2"):
        status, reason = rows[cid]
        assert status == ERROR
        assert "ends before ADT_A01 (HL7 v2.5.1) is complete: after PID it needs PV1" in reason
        assert not any(v in reason for v in VALUES)
    assert not (out / "BAD1.hl7").exists() and not (out / "BAD2.hl7").exists()
    log = (tmp_path / "engine.log").read_text()
    assert not any(v in log for v in VALUES), "the engine log quotes message content"
