"""Sluice: a fast, durable HL7 v2 interface engine."""

__version__ = "0.1.0"
