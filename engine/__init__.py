"""Sluice: a fast, durable HL7 v2 interface engine."""

from engine import native

__version__ = "0.1.0"

native.install()  # compiled or pure hot modules: decided before any of them is imported
