"""Conformance tools: run the converter over a corpus and score it against reference bundles.

``conformance.runner`` walks a directory of HL7 v2 files, converts and validates every message;
``conformance.score`` compares a Sluice bundle with a reference bundle field by field.
See ``docs/conformance.md``.
"""
