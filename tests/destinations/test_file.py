"""File destination: atomic, durable, deterministic files; a batch stops at its first failure."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from engine.destinations.base import CONTENT_FHIR, DestinationContext, Outbound
from engine.destinations.file import FileDestination
from engine.errors import DeliveryError


def _item(mid: int, payload: bytes = b'{"resourceType":"Bundle"}', channel: str = "adt") -> Outbound:
    return Outbound(
        message_id=mid,
        channel=channel,
        destination="out",
        control_id=f"C{mid}",
        message_type="ADT",
        trigger="A01",
        raw=b"MSH|...",
        payload=payload,
        content_type=CONTENT_FHIR,
    )


def _dest(tmp_path: Path, **opts: object) -> FileDestination:
    d = FileDestination(
        "out", {"directory": str(tmp_path / "out"), **opts}, DestinationContext(base_dir=tmp_path)
    )
    asyncio.run(d.start())
    return d


def test_batch_writes_every_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    d = _dest(tmp_path)
    items = [_item(i, f'{{"n":{i}}}'.encode()) for i in range(1, 51)]
    res = asyncio.run(d.deliver_many(items))
    assert res == [f"adt/{i}.json" for i in range(1, 51)]
    for i in range(1, 51):
        assert (tmp_path / "out" / "adt" / f"{i}.json").read_bytes() == f'{{"n":{i}}}'.encode()
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_redelivery_overwrites_the_same_file(tmp_path: Path) -> None:
    d = _dest(tmp_path)
    asyncio.run(d.deliver(_item(7, b"first")))
    asyncio.run(d.deliver_many([_item(7, b"second"), _item(8)]))
    assert (tmp_path / "out" / "adt" / "7.json").read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "out" / "adt").iterdir()) == ["7.json", "8.json"]


def test_batch_stops_at_first_failure(tmp_path: Path) -> None:
    d = _dest(tmp_path, pattern="{channel}/{message_id}.{ext}")
    # A regular file where the second item's directory should be: that write fails.
    (tmp_path / "out" / "blocked").write_bytes(b"not a directory")
    items = [_item(1), _item(2, channel="blocked"), _item(3)]
    res = asyncio.run(d.deliver_many(items))
    assert res[0] == "adt/1.json"
    assert isinstance(res[1], DeliveryError)
    assert "check the directory exists and is writable" in str(res[1])
    assert res[2] is None  # not attempted: stays pending, in order
    assert not (tmp_path / "out" / "adt" / "3.json").exists()
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_single_delivery_error_is_raised(tmp_path: Path) -> None:
    d = _dest(tmp_path)
    (tmp_path / "out" / "adt").write_bytes(b"file in the way")
    with pytest.raises(DeliveryError, match="cannot write"):
        asyncio.run(d.deliver(_item(1)))


def test_fsync_off_still_writes_atomically(tmp_path: Path) -> None:
    d = _dest(tmp_path, fsync=False)
    assert asyncio.run(d.deliver(_item(1, b"x" * 100_000))) == "adt/1.json"
    assert os.path.getsize(tmp_path / "out" / "adt" / "1.json") == 100_000


def test_fields_cannot_escape_the_directory(tmp_path: Path) -> None:
    d = _dest(tmp_path, pattern="{control_id}/{message_id}.{ext}")
    item = Outbound(
        message_id=1,
        channel="adt",
        destination="out",
        control_id="..",
        message_type="ADT",
        trigger="A01",
        raw=b"",
        payload=b"{}",
        content_type=CONTENT_FHIR,
    )
    assert asyncio.run(d.deliver(item)) == "_/1.json"
    slash = Outbound(**{**item.__dict__, "control_id": "../../etc"})
    assert asyncio.run(d.deliver(slash)) == ".._.._etc/1.json"
    assert (tmp_path / "out" / ".._.._etc" / "1.json").exists()


def test_directory_removed_under_the_engine_is_made_again(tmp_path: Path) -> None:
    import shutil

    d = _dest(tmp_path)
    asyncio.run(d.deliver(_item(1)))
    shutil.rmtree(tmp_path / "out" / "adt")
    with pytest.raises(DeliveryError):
        asyncio.run(d.deliver(_item(2)))  # this attempt fails (retryable) ...
    assert asyncio.run(d.deliver(_item(2))) == "adt/2.json"  # ... the retry recreates the directory


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs-batch", "fsync-each"])
def test_both_durability_paths_write_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    """Batches of SYNCFS_MIN_BATCH or more use one syncfs per file system where the OS has it; otherwise
    (or without syncfs) each file is fsynced.  Same files either way."""
    from engine.destinations import file as filemod

    if not syncfs:
        monkeypatch.setattr(filemod, "_syncfs", None)
    elif filemod._syncfs is None:
        pytest.skip("no syncfs on this OS")
    d = _dest(tmp_path)
    items = [_item(i, b"y" * 2000) for i in range(1, filemod.SYNCFS_MIN_BATCH * 3)]
    assert asyncio.run(d.deliver_many(items)) == [
        f"adt/{i}.json" for i in range(1, filemod.SYNCFS_MIN_BATCH * 3)
    ]
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_failed_sync_delivers_nothing_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the batch cannot be made durable, no file is renamed into place and the first item carries the
    error (retryable), the rest stay pending."""
    from engine.destinations import file as filemod

    monkeypatch.setattr(filemod, "_syncfs", lambda fd: -1)
    d = _dest(tmp_path)
    res = asyncio.run(d.deliver_many([_item(i) for i in range(1, 20)]))
    assert isinstance(res[0], DeliveryError) and res[0].retryable
    assert res[1:] == [None] * 18
    assert not (tmp_path / "out" / "adt" / "1.json").exists()
