"""The OpenAPI document checked against the running app with schemathesis (its CLI, every check): every
documented operation with generated inputs; responses must match their schemas and status codes, never a
5xx, schema-valid requests accepted and schema-violating ones refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.adminengine import Admin, adt


def test_api_conforms_to_its_openapi(admin: Admin, tmp_path: Path) -> None:
    admin.send(adt("SCHEMA-1", "MRN-S1"), adt("SCHEMA-2", "MRN-S2"))
    st = Path(sys.executable).with_name("schemathesis")
    res = subprocess.run(
        [
            str(st),
            "run",
            f"{admin.url}/openapi.json",
            # as an admin with PHI access, so every operation is reachable (401/403: test_api.py)
            "-H",
            f"Authorization: Bearer {admin.tokens['admin-phi']}",
            "--checks",
            "all",
            "--max-examples",
            "30",
            "--seed",
            "20261204",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
