"""The ``fhir-to-hl7`` pipeline step.

Channel YAML::

    transform:
      - fhir-to-hl7: {sending_application: SLUICE, sending_facility: PORTAL, placer_system: "urn:portal:appointment"}

The step reads the Work's payload (one FHIR resource, ``application/fhir+json``) and writes its HL7 v2
form.  Which message it becomes (S12, S13, ... or none) depends on what was sent before for the same
resource, which only the store knows: the step puts every candidate in ``facts["writeback"]`` and
``engine/writeback.py`` picks one inside the write transaction (docs/writeback.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from engine.destinations.base import CONTENT_HL7
from engine.errors import ConversionError
from engine.pipeline import StageContext, Work
from engine.registry import transform
from transforms.fhir_to_v2.convert import convert
from transforms.fhir_to_v2.settings import WritebackSettings


@transform("fhir-to-hl7")
def make(options: Mapping[str, Any], ctx: StageContext) -> Callable[[Work], Work]:
    opts = dict(options or {})
    opts.setdefault("site_tz", ctx.site_tz)
    settings = WritebackSettings.from_options(
        opts, ctx.config_file, f"{ctx.key}.fhir-to-hl7" if ctx.key else "fhir-to-hl7"
    )

    def step(work: Work) -> Work:
        if "json" not in work.content_type:
            raise ConversionError(
                "fhir-to-hl7 needs a FHIR resource, and this message is HL7 v2: use the step on a channel "
                "whose source is fhir-poll or http",
                code="200",
            )
        try:
            resource = orjson.loads(work.payload)
        except orjson.JSONDecodeError:
            raise ConversionError("the FHIR content is not valid JSON", code="102") from None
        out = convert(resource, settings)
        first = next(iter(out.variants), None)
        facts = dict(work.facts)
        facts["writeback"] = {
            "resource_type": out.resource_type,
            "key": out.key,
            "state": out.state,
            "content": out.content,
            "timing": out.timing,
            "variants": dict(out.variants),
        }
        meta = dict(work.meta)
        meta["resource_type"] = out.resource_type
        return dataclasses.replace(
            work,
            payload=out.variants[first] if first else b"",
            content_type=CONTENT_HL7,
            facts=facts,
            meta=meta,
        )

    return step
