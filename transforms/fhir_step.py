"""The ``hl7-to-fhir`` pipeline transform step.

Channel YAML::

    transform:
      - step: hl7-to-fhir
        options:
          site_tz: America/New_York
          identifier_systems: {HOSP: "urn:oid:2.16.840.1.113883.19.5"}
          code_maps: {OBX-3: maps/demo-lab-codes.csv}

The factory builds :class:`ConvertSettings` once (a ``ConfigError`` at start-up for bad options);
each Work's payload becomes the JSON-encoded transaction Bundle (decimals with their digits as sent).  ``facts`` carry the
``guards`` ((resource key, status rank) pairs), ``requires`` (resource keys that must exist)
and the counted ``events``; ``meta["resource_types"]`` lists the resource types written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from engine import exactjson
from engine.pipeline import StageContext, Work
from engine.registry import transform
from transforms.convert import convert_report
from transforms.settings import ConvertSettings

FHIR_JSON = "application/fhir+json"


# Resource types a conversion may `require` (transforms.adt.merge: the prior Patient; transforms.siu: the
# Appointment a cancel refers to when the channel wants it booked first).
REQUIRABLE_TYPES = frozenset({"Patient", "Appointment"})


@transform("hl7-to-fhir")
def make(options: Mapping[str, Any], ctx: StageContext) -> Callable[[Work], Work]:
    """Step factory: validated settings once, then one conversion per message."""
    opts = dict(options or {})
    # The channel's site_tz is the default; the step's own option wins when given.
    opts.setdefault("site_tz", ctx.site_tz)
    opts.setdefault("strictness", ctx.strictness)  # the channel's key; the step may override it
    # errors name the step: transform[n].hl7-to-fhir.<option>, as the other steps' do
    where = f"{ctx.key}.hl7-to-fhir" if ctx.key else "options"
    settings = ConvertSettings.from_options(opts, ctx.base_dir, ctx.config_file, where)

    def step(work: Work) -> Work:
        result = convert_report(work.message, settings)
        facts = dict(work.facts)
        facts["guards"] = list(result.guards)
        facts["requires"] = list(result.requires)
        # The resources this bundle writes that a later message may require become known to the
        # engine (an A40's prior patient, a cancel's appointment); what the message *requires* must
        # already be known.  Other types are never required: recording them would only grow the
        # store (about 15 rows per ADT message).
        required = set(result.requires)
        facts["keys"] = [
            url
            for e in result.bundle.get("entry", ())
            if e.get("request", {}).get("method") == "PUT"
            and (url := e["request"]["url"]).split("?", 1)[0] in REQUIRABLE_TYPES
            and url not in required
        ]
        facts["events"] = dict(result.events)
        if result.warnings:
            # (kind, text) pairs: stored with the message when its result is recorded (engine.processing)
            facts["warnings"] = [[k, w] for k, w in zip(result.warning_kinds, result.warnings, strict=True)]
        meta = dict(work.meta)
        meta["resource_types"] = ",".join(result.resource_types)
        return dataclasses.replace(
            work,
            payload=exactjson.dumps(result.bundle),
            content_type=FHIR_JSON,
            facts=facts,
            meta=meta,
        )

    return step
