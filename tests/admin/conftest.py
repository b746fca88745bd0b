"""A real engine process with its admin API on a free port (tests/support/adminengine.py), and tokens made
with `sluice token create`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.adminengine import (
    Admin,
    admin_engine,
    file_destinations,
    make_token,
)
from tests.support.engine import basic_channel


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    tmp = tmp_path_factory.mktemp("admin")

    def channel(port: int) -> dict[str, object]:
        return basic_channel(port, routes=[{"destination": "out"}, {"destination": "picky"}])

    with admin_engine(tmp, channel, file_destinations(tmp)) as a:
        for name, role, extra in (
            ("viewer", "viewer", ()),
            ("operator", "operator", ()),
            ("admin", "admin", ()),
            ("phi-operator", "operator", ("--phi",)),
            ("admin-phi", "admin", ("--phi",)),
        ):
            a.tokens[name] = make_token(a.config, name, role, *extra)
        yield a
