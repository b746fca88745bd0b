"""HL7 v2 → FHIR R4 conversion (pure).  Entry points: :func:`transforms.convert.convert` and
:func:`transforms.convert.convert_report`; settings in :mod:`transforms.settings`."""
