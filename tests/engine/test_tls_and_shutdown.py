"""TLS and mutual TLS on the listener (with `sluice send --tls`), and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine import store as st
from engine.cli import main
from engine.client import MLLPClient, parse_ack
from engine.errors import DeliveryError
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for_async

SAMPLE = Path(__file__).parent / "samples" / "adt_a01.hl7"


def openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    assert exe, "openssl is needed to make throwaway certificates"
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-out", f"{name}.crt", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    return d


def tls_engine(tmp_path: Path, pki: Path, *, mutual: bool) -> EngineProcess:
    port = free_port()
    ch = basic_channel(port)
    ch["source"]["tls"] = {
        "cert": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.crt"),
        "require_client_cert": mutual,
    }
    cfg = write_config(
        tmp_path, channels={"c": ch}, destinations={"out": {"kind": "file", "directory": str(tmp_path / "o")}}
    )
    return EngineProcess(cfg, port)


def test_tls_send(tmp_path: Path, pki: Path) -> None:
    with tls_engine(tmp_path, pki, mutual=False) as eng:
        res = CliRunner().invoke(
            main, ["send", str(SAMPLE), "--to", f"127.0.0.1:{eng.port}", "--tls", "--ca", str(pki / "ca.crt")]
        )
        assert res.exit_code == 0, res.output
        assert "\tAA\tDEMO0001" in res.output
        plain = CliRunner().invoke(
            main, ["send", str(SAMPLE), "--to", f"127.0.0.1:{eng.port}", "--timeout", "2"]
        )
        assert plain.exit_code == 1  # a plain-TCP sender gets no ACK from a TLS port


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    with tls_engine(tmp_path, pki, mutual=True) as eng:
        target = ["--to", f"127.0.0.1:{eng.port}", "--tls", "--ca", str(pki / "ca.crt"), "--timeout", "3"]
        without = CliRunner().invoke(main, ["send", str(SAMPLE), *target])
        assert without.exit_code == 1
        with_cert = CliRunner().invoke(
            main,
            [
                "send",
                str(SAMPLE),
                *target,
                "--cert",
                str(pki / "client.crt"),
                "--key",
                str(pki / "client.key"),
            ],
        )
        assert with_cert.exit_code == 0, with_cert.output
        assert "\tAA\t" in with_cert.output


def test_sigterm_answers_in_flight_and_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port)},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "o")}},
    )
    eng = EngineProcess(cfg, port).start()
    acked: list[str] = []
    not_aa: list[str] = []
    stopped: list[str] = []  # how each sender ended after SIGTERM
    sigterm_sent = False

    async def sender(k: int) -> None:
        c = MLLPClient("127.0.0.1", port, ack_timeout=10)
        try:
            for i in range(100_000):
                cid = f"T{k}-{i}"
                raw = SAMPLE.read_bytes().replace(b"DEMO0001", cid.encode())
                info = parse_ack(await c.send(raw))
                (acked if info.code == "AA" else not_aa).append(cid)
        except DeliveryError as exc:
            # The engine stopped accepting: expected, but only after SIGTERM; anything else propagates.
            assert sigterm_sent, f"sender {k} failed before SIGTERM: {exc}"
            stopped.append(exc.message)
        finally:
            await c.close()

    async def run() -> None:
        nonlocal sigterm_sent
        tasks = [asyncio.create_task(sender(k)) for k in range(5)]
        # SIGTERM while every sender has a message in flight: after each has had some answered.
        await wait_for_async(
            lambda: all(any(c.startswith(f"T{k}-") for c in acked) for k in range(5)) and len(acked) >= 50,
            what=lambda: f"ACKs from all five senders before SIGTERM (have {len(acked)})",
        )
        assert eng.proc is not None
        sigterm_sent = True
        eng.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert eng.proc is not None
    assert eng.proc.wait(30) == 0
    assert not_aa == []
    assert len(stopped) == 5, stopped  # each sender was cut off by the shutdown, none ran out of messages
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    try:
        stored = {r.control_id for r in s.list_messages(limit=100_000)}
        assert set(acked) <= stored  # every ACKed message is in the store
        assert not s.list_messages(status=st.PROCESSING)
        assert s.check() == "ok"
    finally:
        s.close()
    log = (tmp_path / "engine.log").read_text()
    assert '"stopped"' in log
