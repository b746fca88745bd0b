"""Destinations: one module per kind, each registered by name in ``engine.registry``."""
