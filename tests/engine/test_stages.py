"""The channel filter grammar (engine.stages.build_filter): built-in filters, and a plugin filter
registered with the same decorator (``@registry.filter_``) running in a real channel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine import registry, stages
from engine import store as st
from engine.cli import main
from engine.client import MLLPClient, parse_ack
from engine.errors import ConfigError
from engine.hl7 import Message, parse
from engine.pipeline import StageContext
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for

PLUGINS = Path(__file__).resolve().parents[1] / "support" / "plugins"

CTX = StageContext(channel="c", base_dir=PLUGINS, config_file="channels/c.yaml")


def msg(kind: str = "ADT", cid: str = "C1", pv1_2: str = "I", mrn: str = "M1", more: str = "") -> Message:
    return parse(
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||{kind}^A01|{cid}|P|2.5.1\r"
        f"PID|1||{mrn}^^^NORTH^MR{more}||Testpatient^Alex\r"
        f"PV1|1|{pv1_2}\r"
    )


def accepts(spec: Any, m: Message) -> bool:
    pred = stages.build_filter(spec, CTX)
    assert pred is not None
    return bool(pred(m))


def test_no_filter_is_none() -> None:
    assert stages.build_filter(None, CTX) is None


@pytest.mark.parametrize(
    ("spec", "yes", "no"),
    [
        ({"field": "MSH-9.1", "equals": "ADT"}, msg("ADT"), msg("ORU")),
        ({"field": "MSH-9.1", "not_equals": "ADT"}, msg("ORU"), msg("ADT")),
        ({"field": "MSH-9.1", "in": ["ORU", "ADT"]}, msg("ADT"), msg("SIU")),
        ({"field": "PID-3.1", "regex": "^M"}, msg(mrn="M7"), msg(mrn="Q7")),
        ({"field": "PID-3(2).4", "equals": "SOUTH"}, msg(more="~X9^^^SOUTH^PI"), msg()),
        ({"field": "PV1-2", "exists": True}, msg(pv1_2="E"), msg(pv1_2=" ")),
        ({"field": "PV1-2", "exists": False}, msg(pv1_2=""), msg(pv1_2="I")),
        # field values compare as text: YAML numbers and booleans are strings here
        ({"field": "PV1-2", "in": [1, 2]}, msg(pv1_2="2"), msg(pv1_2="3")),
        (
            {"all": [{"field": "MSH-9.1", "equals": "ADT"}, {"field": "PV1-2", "equals": "I"}]},
            msg(),
            msg(pv1_2="O"),
        ),
        (
            {"any": [{"field": "MSH-9.1", "equals": "ORU"}, {"field": "PV1-2", "equals": "E"}]},
            msg("ORU"),
            msg(),
        ),
        ({"not": {"field": "PID-3.1", "regex": "^TEST"}}, msg(mrn="M1"), msg(mrn="TEST1")),
        ({"all": [{"any": [{"not": {"field": "MSH-9.1", "equals": "ORU"}}]}]}, msg(), msg("ORU")),
        ({"python": "sluice_test_filters:inpatient"}, msg(pv1_2="I"), msg(pv1_2="O")),
        ("sluice_test_filters:inpatient", msg(pv1_2="I"), msg(pv1_2="O")),
    ],
)
def test_built_in_filters(spec: Any, yes: Message, no: Message) -> None:
    assert accepts(spec, yes)
    assert not accepts(spec, no)


def test_built_in_filters_are_registered_like_plugins() -> None:
    """Every built-in filter is in the same registry a plugin's ``@registry.filter_`` writes to."""
    assert {"all", "any", "not", "python", "field"} <= set(registry.FILTERS)


@pytest.mark.parametrize(
    ("spec", "key", "text"),
    [
        ("just words", "filter", "a filter must be a mapping or 'module:function'"),
        (["x"], "filter", "a filter must be a mapping or 'module:function'"),
        ({"all": []}, "filter.all", "'all' needs a non-empty list of conditions"),
        ({"any": {"field": "PV1-2"}}, "filter.any", "'any' needs a non-empty list of conditions"),
        ({"not": None}, "filter.not", "'not' needs a condition"),
        ({"field": "PID-x", "equals": "1"}, "filter.field", "PID-x"),
        ({"field": "PV1-2"}, "filter", "a field condition needs exactly one of"),
        ({"field": "PV1-2", "equals": "I", "in": ["I"]}, "filter", "a field condition needs exactly one of"),
        ({"field": "PV1-2", "contains": "I"}, "filter", "a field condition needs exactly one of"),
        ({"field": "PV1-2", "in": "I"}, "filter.in", "'in' needs a list"),
        (
            {"all": [{"field": "PV1-2", "equals": "I"}, {"field": "PV1-2", "regex": "("}]},
            "filter.all[1].regex",
            "bad regular expression",
        ),
        ({"any": [{"not": {"nonsense": 1}}]}, "filter.any[0].not", "unknown filter {'nonsense': 1}"),
        ({"a": 1, "b": 2}, "filter", "unknown filter"),
    ],
)
def test_mistakes_name_the_key(spec: Any, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        stages.build_filter(spec, CTX)
    assert info.value.key == key
    assert info.value.file == "channels/c.yaml"
    assert text in str(info.value)


def test_python_filter_must_be_callable() -> None:
    with pytest.raises(ConfigError, match="is not callable"):
        stages.build_filter({"python": "sluice_test_filters:NOT_CALLABLE"}, CTX)
    with pytest.raises(ConfigError, match="cannot import module"):
        stages.build_filter("no_such_module_anywhere:f", CTX)


def test_a_misspelt_user_step_function_is_located_and_suggests_the_name() -> None:
    with pytest.raises(ConfigError) as info:
        stages.build_step("sluice_test_filters:inpatiant", CTX, "transform[1]")
    assert info.value.file == "channels/c.yaml" and info.value.key == "transform[1]"
    assert "has no attribute 'inpatiant' (did you mean 'inpatient'?)" in str(info.value)
    assert "sluice_test_filters.py" in str(info.value)  # where the functions are
    with pytest.raises(ConfigError) as info:
        stages.build_step("no_such_module_anywhere:f", CTX, "transform[0]")
    assert info.value.file == "channels/c.yaml" and info.value.key == "transform[0]"


@pytest.mark.parametrize(
    ("step", "key", "text"),
    [
        pytest.param(
            {"hl7-to-fhir": {"unmapped_codes": "explode"}},
            "transform[2].hl7-to-fhir.unmapped_codes",
            "'explode' is not a valid value",
            id="hl7-to-fhir-choice",
        ),
        pytest.param(
            {"hl7-to-fhir": {"strip_htm": True}},
            "transform[2].hl7-to-fhir.strip_htm",
            "unknown hl7-to-fhir option 'strip_htm'",
            id="hl7-to-fhir-unknown",
        ),
        pytest.param(
            {"hl7-to-fhir": {"us_core_race_ethnicity": "yes"}},
            "transform[2].hl7-to-fhir.us_core_race_ethnicity",
            "'yes' is not true/false",
            id="hl7-to-fhir-boolean",
        ),
        pytest.param(
            {"hl7-to-fhir": {"coding_systems": {"99LAB": "lab codes"}}},
            "transform[2].hl7-to-fhir.coding_systems",
            "system for coding system '99LAB' is not a URI",
            id="hl7-to-fhir-coding-systems",
        ),
        pytest.param(
            {"hl7-to-fhir": {"coding_systems": {"99^LAB": "urn:x:lab"}}},
            "transform[2].hl7-to-fhir.coding_systems",
            "coding system name '99^LAB' is not a plain name",
            id="hl7-to-fhir-coding-system-name",
        ),
        pytest.param(
            {"hl7-to-fhir": {"code_maps": {"OBX-3": "no-such-map.csv"}}},
            "transform[2].hl7-to-fhir.code_maps.OBX-3",
            "code map file 'no-such-map.csv' not found",
            id="hl7-to-fhir-code-map",
        ),
        pytest.param(
            {"hl7-to-fhir": {"unit_map": {"mmHg": "not ucum"}}},
            "transform[2].hl7-to-fhir.unit_map",
            "not valid UCUM",
            id="hl7-to-fhir-unit-map",
        ),
        pytest.param(
            {"hl7-to-fhir": {"site_tz": "Mars/Olympus_Mons"}},
            "transform[2].hl7-to-fhir.site_tz",
            "unknown time zone",
            id="hl7-to-fhir-zone",
        ),
        pytest.param(
            {"fhir-to-hl7": {"placer": "x"}},
            "transform[2].fhir-to-hl7.placer",
            "unknown fhir-to-hl7 option 'placer'",
            id="fhir-to-hl7-unknown",
        ),
        pytest.param(
            {"passthrough": {"x": 1}}, "transform[2]", "passthrough takes no options", id="passthrough"
        ),
    ],
)
def test_step_option_errors_name_the_step(step: Any, key: str, text: str) -> None:
    """An option error of a built-in step is located at the step (``transform[n].<step>.<option>``), not at a
    bare ``options.<option>`` that does not say which of the channel's steps it is."""
    with pytest.raises(ConfigError) as info:
        stages.build_pipeline(None, ("passthrough", "hl7-to-json", step), CTX)
    assert info.value.file == "channels/c.yaml"
    assert info.value.key == key
    assert text in str(info.value)


def test_plugin_filter_key_path() -> None:
    """A plugin filter gets its key path in ``ctx.key``, as the built-ins do."""
    registry.load_plugins([PLUGINS], ["sluice_test_filters"], PLUGINS)
    with pytest.raises(ConfigError) as info:
        stages.build_filter({"all": [{"field": "PV1-2", "equals": "I"}, {"control_id_prefix": ""}]}, CTX)
    assert info.value.key == "filter.all[1]"
    assert "control_id_prefix needs a non-empty prefix" in str(info.value)


def test_plugin_filter_in_a_channel(tmp_path: Path) -> None:
    """A filter registered by a plugin module (routes.yaml ``plugins:``) filters a running channel,
    alone and nested in built-ins, as the channel filter and as a route filter."""
    port = free_port()
    out, audit = tmp_path / "out", tmp_path / "audit"
    ch = basic_channel(
        port,
        filter={"any": [{"control_id_prefix": ["KEEP", "AUDIT"]}, {"field": "MSH-9.1", "equals": "ORU"}]},
        routes=[
            {"destination": "out", "filter": {"not": {"control_id_prefix": "AUDIT"}}},
            {"destination": "audit", "filter": {"control_id_prefix": "AUDIT"}},
        ],
    )
    dests = {
        name: {"kind": "file", "directory": str(d), "pattern": "{control_id}.{ext}", "fsync": False}
        for name, d in (("out", out), ("audit", audit))
    }
    cfg = write_config(tmp_path, channels={"c": ch}, destinations=dests)
    cfg.write_text(cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_filters]\n")

    check = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert check.exit_code == 0, check.output

    sent = {"KEEP1": "ADT^A01", "DROP1": "ADT^A01", "LAB1": "ORU^R01", "AUDIT1": "ADT^A01"}
    with EngineProcess(cfg, port):
        asyncio.run(_send(port, [_raw(kind, cid) for cid, kind in sent.items()]))
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:

            def finished() -> dict[str, str]:
                rows = s.list_messages()
                done = len(rows) == len(sent) and all(m.status != st.RECEIVED for m in rows)
                return {m.control_id: m.status for m in rows} if done else {}

            status = wait_for(finished, what="every message processed or filtered")
        finally:
            s.close()
        wait_for(
            lambda: (
                (out / "KEEP1.hl7").exists()
                and (out / "LAB1.hl7").exists()
                and (audit / "AUDIT1.hl7").exists()
            ),
            what="the three deliveries",
        )
    assert status == {
        "KEEP1": st.PROCESSED,
        "DROP1": st.FILTERED,
        "LAB1": st.PROCESSED,
        "AUDIT1": st.PROCESSED,
    }
    assert sorted(p.name for p in out.iterdir()) == ["KEEP1.hl7", "LAB1.hl7"]
    assert sorted(p.name for p in audit.iterdir()) == ["AUDIT1.hl7"]


def _raw(kind: str, cid: str) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||{kind}|{cid}|P|2.5.1\r"
        "PID|1||M1^^^NORTH^MR||Testpatient^Alex\r"
    ).encode()


async def _send(port: int, frames: list[bytes]) -> None:
    c = MLLPClient("127.0.0.1", port)
    try:
        for f in frames:
            assert parse_ack(await c.send(f)).code == "AA"
    finally:
        await c.close()
