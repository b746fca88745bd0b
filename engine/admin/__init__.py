"""The operations side of the engine: admin HTTP API, tokens and roles, PHI audit, search.

Pure parts (roles, token hashing, search filters) are tested without a server; the
FastAPI app (:mod:`engine.admin.app`) and its uvicorn runner (:mod:`engine.admin.service`)
are thin adaptors over the same functions the ``sluice`` CLI calls.
"""
