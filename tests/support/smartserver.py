"""A SMART Backend Services authorization server and bearer-protected FHIR endpoint for tests (127.0.0.1).

``POST /token`` checks a client assertion the way an EHR does: form fields (``grant_type=client_credentials``,
``client_assertion_type`` jwt-bearer, ``scope``), the JWT's ``kid`` names a key of the registered JWKS and its
``alg`` is that key's, the signature verifies with that public key, ``iss`` = ``sub`` = the registered client
id, ``aud`` = this token URL, ``exp`` in the future and at most 300 s ahead, and a ``jti`` never seen before
(a replayed assertion is refused).  Refusals are ``400 {"error": "invalid_client"}`` and recorded with why.

``/fhir...`` requires ``Authorization: Bearer <a token this server issued and has not revoked>`` (else 401).
With ``upstream`` set it forwards the request there (the Medplum test server); without, it answers a
transaction/batch POST with a transaction-response of ``201 Created`` entries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import orjson

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class SmartServer:
    client_id: str
    jwks: dict[str, Any]
    upstream: str | None = None
    expires_in: int = 300
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen_jti: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    refusals: list[str] = field(default_factory=list)
    assertions: list[dict[str, Any]] = field(default_factory=list)  # accepted: header + claims
    forms: list[dict[str, str]] = field(default_factory=list)
    fhir_auth: list[str] = field(default_factory=list)
    url: str = ""

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def fhir_url(self) -> str:
        return self.url + "/fhir"

    # ------------------------------------------------------------------------------------------- token

    def check_token_request(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for a token request; pure apart from the jti memory and the issued tokens."""

        def refuse(why: str) -> tuple[int, dict[str, Any]]:
            with self.lock:
                self.refusals.append(why)
            return 400, {"error": "invalid_client", "error_description": why}

        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return refuse("client_assertion_type is not jwt-bearer")
        if not form.get("scope"):
            return 400, {"error": "invalid_scope", "error_description": "scope is required"}
        assertion = form.get("client_assertion") or ""
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            return refuse(f"not a JWT: {exc}")
        keys = [k for k in self.jwks["keys"] if k.get("kid") == header.get("kid")]
        if not keys:
            return refuse(f"no registered key with kid {header.get('kid')!r}")
        jwk = keys[0]
        if header.get("alg") != jwk["alg"] or header.get("typ") != "JWT":
            return refuse(f"header alg/typ {header.get('alg')}/{header.get('typ')} do not fit the key")
        try:
            claims = jwt.decode(
                assertion,
                jwt.PyJWK(jwk).key,
                algorithms=[jwk["alg"]],
                audience=self.token_url,
                issuer=self.client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return refuse(f"assertion rejected: {type(exc).__name__}: {exc}")
        if claims["sub"] != self.client_id:
            return refuse("sub is not the client id")
        if claims["exp"] > time.time() + 300:
            return refuse("exp more than five minutes ahead")
        with self.lock:
            if claims["jti"] in self.seen_jti:
                self.refusals.append("jti reused")
                return 400, {"error": "invalid_client", "error_description": "jti reused"}
            self.seen_jti.add(claims["jti"])
            token = f"smart-tok-{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid.add(token)
            self.assertions.append({"header": header, "claims": claims})
        return 200, {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": form["scope"],
        }

    # -------------------------------------------------------------------------------------------- http

    def start(self) -> SmartServer:
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: Any, ctype: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _fhir(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization") or ""
                with state.lock:
                    state.fhir_auth.append(auth)
                    ok = auth.startswith("Bearer ") and auth[7:] in state.valid
                if not ok:
                    self._reply(401, {"resourceType": "OperationOutcome", "issue": [{"code": "login"}]})
                    return
                if state.upstream is not None:
                    path = self.path[len("/fhir") :]
                    resp = httpx.request(
                        method,
                        state.upstream.rstrip("/") + path,
                        content=body or None,
                        headers={
                            k: v
                            for k, v in self.headers.items()
                            if k.lower().startswith(("content-t", "if-"))
                        },
                        timeout=30,
                    )
                    self._reply(
                        resp.status_code, resp.content, resp.headers.get("content-type", "application/json")
                    )
                    return
                entries = (orjson.loads(body).get("entry") or []) if body else []
                self._reply(
                    200,
                    {
                        "resourceType": "Bundle",
                        "type": "transaction-response",
                        "entry": [{"response": {"status": "201 Created"}} for _ in entries],
                    },
                    "application/fhir+json",
                )

            def do_POST(self) -> None:
                if self.path == "/token":
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                    form = {k: v[0] for k, v in parse_qs(body).items()}
                    with state.lock:
                        state.forms.append(form)
                    if not (self.headers.get("Content-Type") or "").startswith(
                        "application/x-www-form-urlencoded"
                    ):
                        self._reply(400, {"error": "invalid_request"})
                        return
                    status, reply = state.check_token_request(form)
                    self._reply(status, reply)
                elif self.path.startswith("/fhir"):
                    self._fhir("POST")
                else:
                    self._reply(404, {"error": "not found"})

            def do_GET(self) -> None:
                self._fhir("GET")

            def do_PUT(self) -> None:
                self._fhir("PUT")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="smart-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
