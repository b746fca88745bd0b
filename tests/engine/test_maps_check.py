"""`sluice maps check` (issue #16): values no map covers, per facility, from stored (sealed) messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from engine import config, keyring
from engine.cli import main
from engine.store import NewMessage, Store
from tests.support.engine import free_port, write_config

LOINC = {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}
LOC = {"system": "urn:sluice:codesystem:demo-locations", "code": "clinic-1"}
DOC = {"system": "http://hl7.org/fhir/sid/us-npi", "code": "1234567893"}


def message(control: str, facility: str, location: str, doctor: str, obx: list[str]) -> bytes:
    segs = [
        f"MSH|^~\\&|EHR|{facility}^1.2.3^ISO|SL|HOSP|20250101120000||ORU^R01^ORU_R01|{control}|P|2.5.1",
        "PID|1||MRN1^^^NORTH^MR||Secretname^Alex||19800101|F",
        f"PV1|1|O|{location}^101^A||||{doctor}^Docname^Pat||||||||||{doctor}",
        "OBR|1||F1|PANEL^Panel^L",
    ]
    segs += [f"OBX|{i}|NM|{code}||5.5|mmol/L|||||F" for i, code in enumerate(obx, 1)]
    return ("\r".join(segs) + "\r").encode()


def test_maps_check_lists_uncovered_values_per_facility(tmp_path: Path) -> None:
    key_file = tmp_path / "store.keys"
    assert CliRunner().invoke(main, ["keys", "create", "--out", str(key_file)]).exit_code == 0
    channel = {
        "source": {"host": "127.0.0.1", "port": free_port()},
        "transform": [
            {
                "hl7-to-fhir": {
                    "derive_unknown_systems": True,
                    "code_maps": {
                        "OBX-3": {"GLU": LOINC},
                        "PV1-3@NORTH": {"CLINIC1": LOC},  # North's locations only
                        "PV1-7": {"D100": DOC},
                        "99LAB": {"K": LOINC},  # by the CWE-3 coding system name
                    },
                }
            }
        ],
        "routes": [{"destination": "out"}],
    }
    cfg = write_config(
        tmp_path, channels={"lab": channel}, destinations={"out": {"kind": "file", "directory": "out"}}
    )
    routes = yaml.safe_load(cfg.read_text())
    routes["store_encryption"] = {"key_file": str(key_file)}
    cfg.write_text(yaml.safe_dump(routes))
    loaded = config.load(cfg)
    store = Store(loaded.store_url, keys=keyring.from_config(loaded))
    now = time.time()
    rows = [
        # North: CLINIC1 and D100 mapped; GLU mapped; NA^^LN standard; K^^99LAB is not covered: the channel
        # has an OBX-3 map, so the conversion never looks at the 99LAB map for OBX-3 (transforms/datatypes.cwe)
        (
            now - 3600,
            message("1", "NORTH", "CLINIC1", "D100", ["GLU^Glucose^L", "K^Potassium^99LAB", "NA^^LN"]),
        ),
        (now - 1800, message("2", "NORTH", "WARD9", "D200", ["XYZ^Local^L", "XYZ^Local^L"])),
        # South: its CLINIC1 is not covered by North's location map
        (now - 60, message("3", "SOUTH", "CLINIC1", "D100", ["GLU^Glucose^L"])),
        # outside the window
        (now - 40 * 86400, message("4", "SOUTH", "OLDWARD", "D100", [])),
    ]
    try:
        with store.write() as conn:
            store.insert_messages(
                conn,
                [
                    NewMessage(channel="lab", received_at=at, peer="p", raw=raw, status="processed")
                    for at, raw in rows
                ],
            )
    finally:
        store.close()
    assert b"Secretname" not in (tmp_path / "sluice.db").read_bytes()  # sealed at rest
    res = CliRunner().invoke(main, ["maps", "check", "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    gaps = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    got = {(g["facility"], g["field"], g["value"], g["count"]) for g in gaps}
    assert got == {
        ("NORTH", "PV1-3", "WARD9", 1),
        ("NORTH", "PV1-7", "D200", 1),
        ("NORTH", "PV1-17", "D100", 1),  # the provider map is keyed PV1-7 only
        ("NORTH", "PV1-17", "D200", 1),
        ("NORTH", "OBX-3", "XYZ", 2),
        ("NORTH", "OBX-3", "K", 1),
        ("SOUTH", "PV1-3", "CLINIC1", 1),
        ("SOUTH", "PV1-17", "D100", 1),
    }
    xyz = next(g for g in gaps if g["value"] == "XYZ")
    assert xyz["kind"] == "code" and xyz["system"] == "L" and xyz["first_seen"] == xyz["last_seen"]
    assert "Secretname" not in res.output and "Docname" not in res.output and "MRN1" not in res.output
    # the table: a header row, then one row per value; the window moves with --since
    res = CliRunner().invoke(
        main, ["maps", "check", "--config", str(cfg), "--since", "45d", "--channel", "lab"]
    )
    lines = res.output.splitlines()
    assert lines[0].split("\t")[:5] == ["channel", "facility", "field", "kind", "value"]
    assert any("\tOLDWARD\t" in line for line in lines)
    assert "lab: 4 message(s)" in res.output
    res = CliRunner().invoke(main, ["maps", "check", "--config", str(cfg), "--channel", "lba"])
    assert res.exit_code == 1 and "did you mean 'lab'" in res.output


def test_maps_check_escapes_control_characters(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        channels={"lab": {"source": {"port": free_port()}, "transform": ["passthrough"]}},
        destinations={},
    )
    store = Store(config.load(cfg).store_url)
    try:
        with store.write() as conn:
            raw = message("1", "NORTH", "W\x1b[2J", "D1", [])
            store.insert_messages(
                conn, [NewMessage(channel="lab", received_at=time.time(), peer="p", raw=raw)]
            )
    finally:
        store.close()
    res = CliRunner().invoke(main, ["maps", "check", "--config", str(cfg)])
    assert res.exit_code == 0 and "\x1b" not in res.output and "W\\x1b[2J" in res.output


def test_codes_under_a_channel_coding_system_need_no_map() -> None:
    """A CWE-3 name the channel gives a system of its own (hl7-to-fhir coding_systems) is a standard system for
    that channel: its codes are that system's, not local codes waiting for a map."""
    from engine import mapcoverage
    from engine.hl7 import parse_bytes

    raw = message("1", "NORTH", "CLINIC1", "D100", ["K^Potassium^99LAB", "XYZ^Local^L"])
    plain = mapcoverage.check([(0.0, raw)], {})
    named = mapcoverage.check([(0.0, raw)], {}, systems=frozenset({"99LAB"}))
    assert {g.value for g in plain.gaps() if g.field == "OBX-3"} == {"K", "XYZ"}
    assert {g.value for g in named.gaps() if g.field == "OBX-3"} == {"XYZ"}
    assert parse_bytes(raw).message_type == "ORU"
