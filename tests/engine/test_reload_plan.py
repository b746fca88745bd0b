"""engine/reload.py's plan (pure): what a reload changes, and what it refuses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engine import config, reload
from engine.errors import ConfigError
from tests.support.engine import basic_channel, write_config


def _cfg(tmp_path: Path) -> config.Config:
    path = write_config(
        tmp_path,
        channels={"a": basic_channel(2601), "b": basic_channel(2602)},
        destinations={"out": {"kind": "file", "directory": "out"}, "x": {"kind": "file", "directory": "x"}},
    )
    return config.load(path)


def test_plan_names_every_change(tmp_path: Path) -> None:
    old = _cfg(tmp_path)
    a, b = old.channels
    moved = replace(b, source=replace(b.source, port=2700))
    c = replace(a, name="c", source=replace(a.source, port=2603))
    dests = dict(old.destinations)
    dests["out"] = replace(dests["out"], lanes=8)
    del dests["x"]
    dests["y"] = replace(old.destinations["x"], name="y")
    new = replace(old, channels=(moved, c), destinations=dests)
    plan = reload.plan(old, new)
    assert plan.summary() == {
        "channels_added": ["c"],
        "channels_removed": ["a"],
        "channels_changed": ["b"],
        "channels_rebound": ["b"],
        "destinations_added": ["y"],
        "destinations_removed": ["x"],
        "destinations_changed": ["out"],
    }
    assert plan.describe().startswith("channels added: c; channels removed: a")
    assert reload.plan(old, old).empty and reload.plan(old, old).describe() == "nothing changed"
    disabled = replace(old, channels=(replace(a, enabled=False), b))
    assert reload.plan(old, disabled).channels_removed == ("a",)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"store_url": "sqlite:////tmp/other.db"}, "store"),
        ({"node_id": "node-9"}, "node_id"),
        ({"processing_workers": 7}, "processing.workers"),
    ],
)
def test_restart_only_changes_are_refused_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    old = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=f"{key} changed, which the running engine cannot apply") as e:
        reload.plan(old, replace(old, **change))
    assert "restart" in str(e.value) and "unchanged" in str(e.value)


def test_an_edited_map_file_changes_its_channel(tmp_path: Path) -> None:
    """The channel YAML is the same, its code map has a new row: the reload gives the channel the new maps."""
    maps = tmp_path / "transforms" / "maps"
    maps.mkdir(parents=True)
    (maps / "lab.csv").write_text("local_code,system,code,display\nGLU,http://loinc.org,2345-7,Glucose\n")
    mapped = basic_channel(2601, transform=[{"hl7-to-fhir": {"code_maps": {"OBX-3": "lab.csv"}}}])
    path = write_config(
        tmp_path,
        channels={"a": mapped, "b": basic_channel(2602)},
        destinations={"out": {"kind": "file", "directory": "out"}},
    )
    old = config.load(path)
    assert reload.plan(old, config.load(path)).empty
    with (maps / "lab.csv").open("a") as f:
        f.write("TRIGX,http://loinc.org,2571-8,Triglyceride\n")
    plan = reload.plan(old, config.load(path))
    assert plan.summary() == {"channels_changed": ["a"]}
    assert plan.describe() == "channels changed: a"
