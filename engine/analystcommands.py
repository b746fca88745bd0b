"""The interface analyst's commands: ``sluice test``, ``sluice generate``, ``sluice anonymize``.

Thin click adaptors: the work is in engine/channeltest.py, engine/synthetic.py and engine/anonymize.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.clioptions import config_option
from engine.errors import ConfigError


@click.command("test")
@click.argument("channels", nargs=-1)
@config_option
@click.option("--update", is_flag=True, help="Rewrite the golden files with what the channel produces now.")
@click.option("-v", "--verbose", is_flag=True, help="Also list every message's status and ACK code.")
def test_command(channels: tuple[str, ...], config_path: str, update: bool, verbose: bool) -> None:
    """Run channel tests (channels/<name>_test.yaml beside each channel); exit 1 when any case fails.

    Every case sends its messages (or, for a write-back channel, FHIR resources) through the channel's real
    pipeline and applies the FHIR Bundles to an in-memory FHIR target, then checks ACK codes, statuses,
    FHIRPath assertions, the HL7 messages sent and golden files.  Disabled channels are tested too.
    With CHANNEL names, only those channels (each must have a test file).  See docs/testing-channels.md.
    """
    from engine import channeltest, logs, registry
    from engine.cli import _load_config

    cfg = _load_config(config_path)
    logs.configure("console", "warning")  # a case's processing errors are in its report, not log lines
    try:
        registry.load_plugins(cfg.plugin_paths, cfg.plugins, cfg.base_dir)
        pairs = channeltest.discover(cfg, channels)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    strays = [] if channels else channeltest.stray_test_files(cfg)
    if not pairs:
        raise click.ClickException(
            f"no channel of {cfg.file} has a test file (channels/<name>{channeltest.TEST_SUFFIX}); "
            "see docs/testing-channels.md"
            + "".join(f"\n{channeltest.stray_reason(stray, cfg)}" for stray in strays)
        )
    passed = failed = updated = 0
    for stray in strays:
        click.echo(f"FAIL {channeltest.stray_reason(stray, cfg)}")
        failed += 1
    for ch, tf in pairs:
        try:
            tests = channeltest.load_test_file(tf, cfg.base_dir)
            if tests.channel != ch.name:
                raise ConfigError(
                    f"the file tests channel {tests.channel!r} but sits beside channel {ch.name!r}",
                    file=str(tf),
                    key="channel",
                    hint=f"write `channel: {ch.name}`",
                )
            runner = channeltest.Runner(cfg, ch)
        except ConfigError as exc:
            raise click.ClickException(f"config error: {exc}") from exc
        for case in tests.cases:
            res = runner.run_case(case, update=update)
            mark = "ok" if res.ok else "FAIL"
            click.echo(f"{mark:4} {ch.name}: {case.name}" + ("  (golden updated)" if res.updated else ""))
            if verbose or not res.ok:
                for n, o in enumerate(res.outcomes, 1):
                    why = f": {o.reason}" if o.reason else ""
                    # a FHIR resource has no ACK: what it sent is what tells
                    said = f"ACK {o.ack or '-'}" if not o.fhir else ""
                    if o.sent_type:
                        said = f"{said}, sent {o.sent_type}" if said else f"sent {o.sent_type}"
                    click.echo(f"       message {n} {o.label}: {o.status}, {said}{why}")
            for failure in res.failures:
                click.echo("     - " + failure.replace("\n", "\n       "))
            passed += res.ok
            failed += not res.ok
            updated += res.updated
    summary = f"{passed} passed, {failed} failed"
    if update:
        summary += f", {updated} golden file(s) written"
    click.echo(summary)
    sys.exit(1 if failed else 0)


@click.command("generate")
@click.option(
    "--type",
    "message_type",
    required=True,
    help="Message type and trigger, e.g. ADT^A01, ORU^R01, SIU^S12 (see docs/cli.md for the list).",
)
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1), help="How many messages.")
@click.option(
    "--patients",
    type=click.IntRange(min=1),
    help="Draw the messages from this many synthetic patients (default: one patient per message).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same messages.")
@click.option(
    "--facility", default="SYNTHCLINIC", show_default=True, help="Sending facility (MSH-4) and authority."
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the messages to this file (default: standard output, one segment a line).",
)
def generate_command(
    message_type: str, count: int, patients: int | None, seed: int, facility: str, out: str | None
) -> None:
    """Make synthetic, valid HL7 v2 messages (invented people only) for tests and load tests."""
    from engine import synthetic

    try:
        synthetic.parse_type(message_type)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--type") from None
    messages = synthetic.generate(message_type, count, patients=patients, seed=seed, facility=facility)
    if out:
        with open(out, "w", encoding="ascii", newline="") as f:
            for m in messages:
                f.write(m)
        click.echo(f"{count} {message_type.upper()} message(s) written to {out}", err=True)
        return
    for m in messages:
        click.echo(m.replace("\r", "\n"), nl=False)


@click.command("anonymize")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the output files."
)
@click.option(
    "--key",
    envvar="SLUICE_ANONYMIZE_KEY",
    help="Secret that keys the surrogates: the same key gives the same surrogates in every run "
    "(default: a random key, so each run's surrogates differ).",
)
@click.option("--force", is_flag=True, help="Overwrite output files that exist.")
def anonymize_command(files: tuple[str, ...], out_dir: str, key: str | None, force: bool) -> None:
    """De-identify HL7 v2 files for test use, then check the output for any original value left.

    Names, identifiers, addresses and phones get consistent surrogates (the same MRN gets the same
    surrogate in every file), dates move by a per-patient number of days (intervals kept), free text is
    redacted; separators, escapes and every other field are kept.  Exit 1 when the leak check finds an
    original value in the output (reported by place, never by value) or a message cannot be read.
    """
    import contextlib
    import os
    import secrets

    from engine.anonymize import Anonymizer
    from engine.cli import split_messages
    from engine.errors import SluiceError

    target = Path(out_dir)
    names = [Path(f).name for f in files]
    if len(set(names)) != len(names):
        raise click.UsageError("two input files have the same name; the output folder would hold only one")
    target.mkdir(parents=True, exist_ok=True)
    clashes = [n for n in names if (target / n).exists()]
    if clashes and not force:
        raise click.UsageError(f"{target / clashes[0]} exists; use --force to overwrite, or another --out")
    anon = Anonymizer(key.encode() if key else secrets.token_bytes(32))
    inputs = [Path(f).read_bytes() for f in files]
    for data, name in zip(inputs, names, strict=True):  # first pass: every original value is known
        for i, raw in enumerate(split_messages(data), 1):
            with contextlib.suppress(SluiceError):  # reported by the second pass
                anon.learn(raw.decode("utf-8", "surrogateescape"), f"{name}#{i}")
    outputs: list[tuple[str, str]] = []
    failed = 0
    for data, name in zip(inputs, names, strict=True):
        sep = "\r\n" if b"\r\n" in data else "\n" if b"\n" in data and b"\r" not in data else "\r"
        done: list[str] = []
        for i, raw in enumerate(split_messages(data), 1):
            label = f"{name}#{i}"
            try:
                text = anon.message(raw.decode("utf-8", "surrogateescape"), label)
            except SluiceError as exc:
                click.echo(
                    f"{label}: cannot read this message ({exc}); it is left out of the output", err=True
                )
                failed += 1
                continue
            done.append(text)
            outputs.append((f"{target / name}#{i}", text))
        body = "".join(done).replace("\r", sep) if sep != "\r" else "".join(done)
        out_file = target / name
        out_file.write_bytes(body.encode("utf-8", "surrogateescape"))
        os.chmod(out_file, 0o600)
    leaks = anon.leaks(outputs)
    for leak in leaks:
        click.echo(
            f"leak: {leak.output} {leak.found_in} holds the original value of {leak.came_from}", err=True
        )
    click.echo(
        f"{len(outputs)} message(s) from {len(files)} file(s) written to {target}; "
        + (
            f"leak check: {len(leaks)} original value(s) found"
            if leaks
            else "leak check: no original value found"
        )
    )
    sys.exit(1 if leaks or failed else 0)


def register(main: click.Group) -> None:
    """Add the analyst's commands to the ``sluice`` group (engine/cli.py)."""
    main.add_command(test_command)
    main.add_command(generate_command)
    main.add_command(anonymize_command)
