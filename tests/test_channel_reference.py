"""docs/channel-reference.md is generated from the loader (engine/schema.py) and must not go stale."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from engine import schema
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
REFERENCE = ROOT / "docs" / "channel-reference.md"


def test_every_channel_key_the_loader_reads_is_in_the_schema_and_documented() -> None:
    documented = schema.meanings(CONFIG_DOC.read_text())
    read = {k.path for k in schema.channel_keys()}
    assert read - set(documented) == set(), (
        "keys the loader reads without a row in docs/configuration.md (Channel files): "
        f"{sorted(read - set(documented))}"
    )
    assert set(documented) - read == set(), (
        "keys documented in docs/configuration.md (Channel files) that the examples of engine/schema.py do not "
        f"open: {sorted(set(documented) - read)}; add them to MLLP_CHANNEL/POLL_CHANNEL there"
    )
    assert all(documented[k] for k in read), [k for k in read if not documented[k]]


def test_channel_reference_is_not_stale() -> None:
    expected = schema.markdown(schema.meanings(CONFIG_DOC.read_text()))
    assert REFERENCE.read_text() == expected, (
        "docs/channel-reference.md is stale: run `sluice config schema --markdown docs/channel-reference.md`"
    )


def test_config_schema_prints_a_json_schema() -> None:
    res = CliRunner().invoke(main, ["config", "schema"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{") :])
    src = doc["properties"]["source"]["properties"]
    assert src["kind"]["enum"][:2] == ["mllp", "fhir-poll"] and src["port"] == {
        "type": "integer",
        "default": 2575,
    }
    assert doc["properties"]["ack"]["enum"] == ["on-commit", "after-processing"]
    assert doc["properties"]["routes"]["type"] == "array"
    assert "destination" in doc["properties"]["routes"]["items"]["properties"]


def test_a_plugin_registered_in_the_process_is_not_in_the_reference() -> None:
    """The reference lists Sluice's own steps and filters: a plugin another test (or a site) registered in this
    process does not change it (the full suite registers tests/support/plugins' filters before this runs)."""
    from engine import registry

    @registry.filter_("zz_reference_probe")
    def probe(arg: object, ctx: object) -> object:  # pragma: no cover - never called
        return None

    try:
        text = schema.markdown(schema.meanings(CONFIG_DOC.read_text()))
        assert "zz_reference_probe" not in text
        assert "`hl7-to-fhir`" in text and "`field`" in text
    finally:
        registry.FILTERS.pop("zz_reference_probe", None)
