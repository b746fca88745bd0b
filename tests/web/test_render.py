"""The console's pure helpers: HL7 highlighting, masked config, recent figures, times."""

from __future__ import annotations

import re

from engine.config import DestinationConfig
from engine.web import render

ADT = (
    "MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|C1|P|2.5.1\r"
    "PID|1||MRN1^^^NORTH^MR~ALT9^^^SOUTH^MR||Testpatient^Alex||19800101|F\r"
    "NTE|1||<script>alert(1)</script> & more\r"
)


def test_each_segment_is_a_block_and_every_field_names_its_position() -> None:
    html = str(render.hl7_markup(ADT))
    assert html.count('class="segment"') == 3
    assert render.hl7_segment_count(ADT) == 3
    assert '<span class="seg">PID</span>' in html
    assert 'title="PID-3"' in html and 'title="MSH-9"' in html and 'title="MSH-10">C1<' in html
    # MSH-1 is the separator and MSH-2 the encoding characters, kept whole
    assert 'title="MSH-1">|<' in html and 'title="MSH-2">^~\\&amp;<' in html
    # components and repetitions are marked, not split into fields
    pid3 = re.search(r'title="PID-3">(.*?)</span><span class="sep">', html)
    assert pid3 and pid3.group(1).count('class="csep"') == 8 and pid3.group(1).count('class="rsep"') == 1
    # nothing from the message reaches the page unescaped
    assert (
        "<script>" not in html and "&lt;script&gt;" in html and '<span class="ssep">&amp;</span> more' in html
    )


def test_segment_separators_and_other_delimiters() -> None:
    raw = "MSH#*~\\&#APP#FAC\nPID#1##ID1*X\r\nPV1#1\n"
    html = str(render.hl7_markup(raw))
    assert html.count('class="segment"') == 3
    assert 'title="PID-3">ID1<span class="csep">*</span>X</span>' in html
    assert 'title="MSH-3">APP<' in html


def test_a_huge_message_is_split_into_segments_only() -> None:
    big = ADT + "OBX|1|TX|||" + "<b>x</b>" * (render.HIGHLIGHT_MAX // 8) + "\r"
    html = str(render.hl7_markup(big))
    assert html.count('class="segment"') == 4 and 'class="f ' not in html
    assert "<b>" not in html and html.startswith('<span class="segment">MSH|^~\\&amp;|EHR')


def test_outputs_are_made_readable() -> None:
    assert render.pretty_output("application/fhir+json", '{"a":{"b":1}}') == '{\n  "a": {\n    "b": 1\n  }\n}'
    assert render.pretty_output("x-application/hl7-v2+er7", "MSH|^~\\&|A\rPID|1") == "MSH|^~\\&|A\nPID|1"
    assert render.pretty_output("text/plain", "not json {") == "not json {"
    assert render.pretty_output("application/json", None) == ""
    assert render.is_hl7("x-application/hl7-v2+er7", "MSH|") and not render.is_hl7("application/json", "{}")


def test_config_secrets_are_masked_and_references_shown() -> None:
    dest = DestinationConfig(
        name="hook",
        kind="http",
        options={
            "url": "https://user:hunter2@example.org/in",
            "auth": {"type": "oauth2", "token_url": "https://idp/token", "client_secret": "s3cr3t-literal"},
            "headers": {"X-Tenant": "north", "Authorization": {"env": "HOOK_AUTH"}, "X-Api-Key": "k-123"},
            "signing_secret": {"file": "/run/secrets/hook"},
            "password": "plain-pw",
            "token": "",
        },
    )
    text = render.config_text(dest)
    for secret in ("hunter2", "s3cr3t-literal", "k-123", "plain-pw"):
        assert secret not in text
    assert "https://user:••••••@example.org/in" in text
    assert "token_url: https://idp/token" in text  # where a token comes from is not a secret
    assert "env: HOOK_AUTH" in text and "file: /run/secrets/hook" in text
    assert "X-Tenant: north" in text and text.count(render.MASK) == 3
    assert render.mask_url("amqp://guest:guest@127.0.0.1/") == "amqp://guest:••••••@127.0.0.1/"
    assert render.mask_url("http://127.0.0.1:9/hook") == "http://127.0.0.1:9/hook"


def test_recent_counts_growth_inside_the_window_only() -> None:
    r = render.Recent(60, every=5, start=1000.0)
    r.observe(1010, {"x": 3})
    assert r.delta("x") == 3  # since the engine started (all counters 0 then)
    r.observe(1030, {"x": 5})
    r.observe(1050, {"x": 9})
    assert r.delta("x") == 9
    r.observe(1100, {"x": 10})  # the window now starts at 1040: the figure from 1030 is the base
    assert r.delta("x") == 5
    r.observe(1102, {"x": 12})
    assert r.delta("x") == 7
    r.observe(1104, {"x": 13})  # closer than `every` to the one before: replaces the newest figure
    assert r.delta("x") == 8
    r.observe(1200, {"x": 13})
    assert r.delta("x") == 0
    r.observe(1300, {"x": 2})  # a counter that drops counts from 0 again
    assert r.delta("x") == 2
    assert r.delta("never-seen") == 0


def test_mean_lag_over_the_window() -> None:
    r = render.Recent(300, start=0.0)
    r.observe(
        10, {("lag_sum", "a"): 4.0, ("lag_count", "a"): 2, ("lag_sum", "b"): 2.0, ("lag_count", "b"): 2}
    )
    assert render.mean_lag(r, ["a"]) == 2.0
    assert render.mean_lag(r, ["a", "b"]) == 1.5
    assert render.mean_lag(r, ["c"]) is None


def test_sum_samples_groups_by_labels() -> None:
    samples = {
        ("sluice_rejections_total", (("channel", "a"), ("class", "auth"))): 2.0,
        ("sluice_rejections_total", (("channel", "b"), ("class", "auth"))): 1.0,
        ("sluice_dead_letters_total", (("destination", "x"),)): 4.0,
    }
    assert render.sum_samples(samples, "sluice_rejections_total", k="class") == {("auth",): 3.0}
    assert render.sum_samples(samples, "sluice_dead_letters_total", d="destination") == {("x",): 4.0}


def test_durations_for_people() -> None:
    assert render.fmt_age(0.42) == "0.4 s"
    assert render.fmt_age(42) == "42 s"
    assert render.fmt_age(185) == "3 min 5 s"
    assert render.fmt_age(3600 * 2 + 600) == "2 h 10 min"
    assert render.fmt_age(86400 * 3 + 3600 * 4) == "3 d 4 h"
    assert render.fmt_age(None) == "—" and render.fmt_ago(None) == "never"
    assert render.fmt_ago(100.0, now=112.0) == "12 s ago"
    assert render.short_json({"ids": list(range(500))}, most=40).endswith("…")
