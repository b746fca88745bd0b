"""HL7 v2 → FHIR R4 conversion (pure).  Entry points: :func:`transforms.convert.convert` and
:func:`transforms.convert.convert_report`; settings in :mod:`transforms.settings`."""

import engine  # noqa: F401  (engine.native decides compiled or pure before any mapper module loads)
