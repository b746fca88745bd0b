"""Pure helpers for the console's pages: HL7 highlighting, times, masked config, recent figures.

Nothing here does I/O; every function is tested on plain values (tests/web/test_render.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from markupsafe import Markup, escape

# ------------------------------------------------------------------ HL7


def _delimiters(segment: str) -> tuple[str, str, str, str, str] | None:
    """(field, component, repetition, escape, subcomponent) from an MSH/FHS/BHS segment."""
    if segment[:3] in ("MSH", "FHS", "BHS") and len(segment) >= 8:
        return segment[3], segment[4], segment[5], segment[6], segment[7]
    return None


def _field_markup(value: str, comp: str, rep: str, sub: str) -> str:
    out: list[str] = []
    for ch in value:
        if ch == comp:
            out.append('<span class="csep">' + str(escape(ch)) + "</span>")
        elif ch == rep:
            out.append('<span class="rsep">' + str(escape(ch)) + "</span>")
        elif ch == sub:
            out.append('<span class="ssep">' + str(escape(ch)) + "</span>")
        else:
            out.append(str(escape(ch)))
    return "".join(out)


HIGHLIGHT_MAX = 512 * 1024  # a larger message is shown one segment a line, without field markup


def hl7_markup(raw: str) -> Markup:
    """The message with each segment in a block of its own and fields and separators in spans.

    Every field carries its position as a tooltip (``PID-3``); the non-empty fields alternate two
    classes so neighbours stand apart.  All text is escaped: a message may contain ``<script>``.
    Past HIGHLIGHT_MAX characters only the segments are split (the page stays a few times the message).
    """
    segments = [s for s in re.split(r"\r\n|\r|\n", raw) if s]
    if len(raw) > HIGHLIGHT_MAX:
        return Markup("".join(f'<span class="segment">{escape(s)}</span>' for s in segments))
    field_sep, comp, rep, sub = "|", "^", "~", "&"
    lines: list[str] = []
    for seg in segments:
        delims = _delimiters(seg)
        if delims is not None:
            field_sep, comp, rep, _esc, sub = delims
        name = seg[:3]
        parts = seg.split(field_sep)
        html = ['<span class="segment"><span class="seg">' + str(escape(parts[0])) + "</span>"]
        header = delims is not None
        if header:
            # MSH-1 is the field separator itself, MSH-2 the encoding characters (not split)
            html.append(
                f'<span class="sep" title="{escape(name)}-1">{escape(field_sep)}</span>'
                f'<span class="f f2" title="{escape(name)}-2">{escape(parts[1] if len(parts) > 1 else "")}</span>'
            )
            fields = parts[2:]
            first = 3
        else:
            fields = parts[1:]
            first = 1
        shown = 0
        for i, value in enumerate(fields):
            pos = first + i
            html.append('<span class="sep">' + str(escape(field_sep)) + "</span>")
            if value:
                shown += 1
                cls = "f1" if shown % 2 else "f2"
                html.append(
                    f'<span class="f {cls}" title="{escape(name)}-{pos}">'
                    + _field_markup(value, comp, rep, sub)
                    + "</span>"
                )
        html.append("</span>")
        lines.append("".join(html))
    return Markup("".join(lines))


def hl7_segment_count(raw: str) -> int:
    return len([s for s in re.split(r"\r\n|\r|\n", raw) if s])


def pretty_output(content_type: str, body: str | None) -> str:
    """A produced payload for reading: JSON indented, HL7 one segment a line, anything else as is."""
    if body is None:
        return ""
    text = body.strip()
    if "json" in content_type or text[:1] in ("{", "["):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            return body
    if text.startswith(("MSH", "FHS", "BHS")):
        return "\n".join(s for s in re.split(r"\r\n|\r|\n", body) if s)
    return body


def is_hl7(content_type: str, body: str | None) -> bool:
    return bool(body) and ("hl7" in content_type or (body or "").lstrip().startswith(("MSH", "FHS", "BHS")))


# ------------------------------------------------------------------ times


def fmt_time(epoch: float | None) -> str:
    """Local time of the engine, to the second, with its UTC offset."""
    if epoch is None:
        return "—"
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def iso_utc(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def fmt_age(seconds: float | None) -> str:
    """A duration for people: 0.4 s, 12 s, 3 min 5 s, 2 h 10 min, 3 d 4 h."""
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(int(s), 60)
        return f"{m} min {sec} s" if sec and m < 10 else f"{m} min"
    if s < 86400:
        h, rest = divmod(int(s), 3600)
        return f"{h} h {rest // 60} min" if rest >= 60 else f"{h} h"
    d, rest = divmod(int(s), 86400)
    return f"{d} d {rest // 3600} h" if rest >= 3600 else f"{d} d"


def fmt_ago(epoch: float | None, now: float | None = None) -> str:
    if epoch is None:
        return "never"
    now = time.time() if now is None else now
    return fmt_age(now - epoch) + " ago"


def short_json(value: Any, most: int = 300) -> str:
    """A small JSON rendering of an audit row's detail, cut at ``most`` characters."""
    if not value:
        return ""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= most else text[: most - 1] + "…"


# ------------------------------------------------------------------ config, secrets masked

MASK = "•••••• (masked)"
SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|api[-_]?key|authorization|credential|private[-_]?key|cookie|signing)",
    re.IGNORECASE,
)
NOT_SECRET_KEY = re.compile(r"^(token_url|tokens?_endpoint|refresh_margin)$", re.IGNORECASE)


def _is_ref(value: Any) -> bool:
    """``{env: NAME}`` or ``{file: path}``: a pointer to a secret, not the secret."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("env", "file")


def mask_url(url: str) -> str:
    """``scheme://user:password@host`` → the password masked; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:••••••@{netloc[-1]}"))


def plain(value: Any) -> Any:
    """A config value as plain data (dataclasses, paths and tuples turned into dicts, strings, lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def masked(value: Any, key: str = "") -> Any:
    """Plain data with every secret masked: values under a secret-looking key (unless they only point to
    an environment variable or a file), and passwords inside URLs."""
    if _is_ref(value):
        return dict(value)
    if isinstance(value, Mapping):
        return {str(k): masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if key and SECRET_KEY.search(key) and not NOT_SECRET_KEY.match(key) and value not in (None, "", False):
        if isinstance(value, bool | int | float):
            return value
        return MASK
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def config_text(value: Any) -> str:
    """Masked plain data as YAML, for a ``<pre>``."""
    import yaml

    return yaml.safe_dump(masked(plain(value)), sort_keys=False, allow_unicode=True, width=100).rstrip()


# ------------------------------------------------------------------ recent figures from counters

Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def sum_samples(samples: Samples, name: str, **labels: str) -> dict[tuple[str, ...], float]:
    """Samples of one metric summed by the given label names (``labels`` maps output key → label)."""
    out: dict[tuple[str, ...], float] = {}
    for (n, lbls), v in samples.items():
        if n != name:
            continue
        d = dict(lbls)
        k = tuple(d.get(lbl, "") for lbl in labels.values())
        out[k] = out.get(k, 0.0) + v
    return out


class Recent:
    """Remembers counter totals over time, to tell how much each grew in the last ``window`` seconds.

    ``observe`` is called whenever a page is drawn; figures are kept at least ``every`` seconds
    apart (the newest may be closer), and the last one at or before the window's start is the base.  Made with ``start`` (the
    engine's start, when every counter was 0), it answers for the whole window from the first page on.
    A counter that drops (a restart) counts from 0 again.
    """

    def __init__(self, window: float, *, every: float = 5.0, start: float | None = None):
        self.window = window
        self.every = every
        self._history: deque[tuple[float, dict[Any, float]]] = deque()
        if start is not None:
            self._history.append((start, {}))
        self._latest: dict[Any, float] = {}

    def observe(self, now: float, totals: Mapping[Any, float]) -> None:
        self._latest = dict(totals)
        h = self._history
        if len(h) >= 2 and now - h[-2][0] < self.every:
            h[-1] = (now, self._latest)  # too close to the one before: the newest figure replaces it
        else:
            h.append((now, self._latest))
        while len(self._history) > 1 and self._history[1][0] <= now - self.window:
            self._history.popleft()

    def delta(self, key: Any) -> float:
        """Growth of ``key`` over the window (or since the oldest figure remembered)."""
        if not self._history:
            return 0.0
        newest = self._latest.get(key, 0.0)
        start = self._history[0][1].get(key, 0.0)
        return newest - start if newest >= start else newest

    def keys(self) -> Iterable[Any]:
        return self._latest.keys()


def mean_lag(recent: Recent, destinations: Iterable[str]) -> float | None:
    """Mean received → delivered time over the window for these destinations (None: nothing delivered)."""
    total = count = 0.0
    for d in destinations:
        total += recent.delta(("lag_sum", d))
        count += recent.delta(("lag_count", d))
    return total / count if count > 0 else None
