"""A tiny OpenID-style token issuer on loopback, shaped like the Keycloak realm MONAI Label's
authentication expects, so that tests check tokens end to end (nothing is patched out).

- ``GET {realm}`` answers ``{"realm": ..., "public_key": <base64 DER SubjectPublicKeyInfo>}``
  (MONAI Label reads the key there);
- ``GET {realm}/.well-known/openid-configuration`` gives ``issuer``, ``token_endpoint``;
- ``POST {realm}/protocol/openid-connect/token`` with the password grant (form ``client_id``,
  ``username``, ``password``, ``grant_type=password``) returns an RS256 access token with
  ``preferred_username``, ``email``, ``name``, ``realm_access.roles``, ``exp``, ``iat``, ``iss``;
  a wrong password is ``401 invalid_grant``, as Keycloak answers.

The users and their roles follow MONAI Label's role names: a user holds its own role and every
role below it (admin > reviewer > annotator > user), like a Keycloak realm with composite roles.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, Optional, Tuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROLE_ADMIN = "monailabel-admin"
ROLE_REVIEWER = "monailabel-reviewer"
ROLE_ANNOTATOR = "monailabel-annotator"
ROLE_USER = "monailabel-user"

#: user name -> (password, roles)
DEFAULT_USERS: Dict[str, Tuple[str, list]] = {
    "alice-admin": ("admin-secret", [ROLE_ADMIN, ROLE_REVIEWER, ROLE_ANNOTATOR, ROLE_USER]),
    "rita-reviewer": ("reviewer-secret", [ROLE_REVIEWER, ROLE_ANNOTATOR, ROLE_USER]),
    "anna-annotator": ("annotator-secret", [ROLE_ANNOTATOR, ROLE_USER]),
    "uwe-user": ("user-secret", [ROLE_USER]),
    "nora-norole": ("norole-secret", []),
}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_key_b64(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


class TokenIssuer:
    """Start with :meth:`start` (or as a context manager); ``realm_uri`` is what
    ``MONAI_LABEL_AUTH_REALM_URI`` must be (see :meth:`env`).

    Args:
        users: user name -> (password, roles).
        client_id: the client the token endpoint accepts.
        lifetime: seconds a token is valid.
    """

    def __init__(self, users: Optional[Dict[str, Tuple[str, list]]] = None, realm: str = "thyroid",
                 client_id: str = "monailabel-app", lifetime: int = 300) -> None:
        self.users = dict(users or DEFAULT_USERS)
        self.realm = realm
        self.client_id = client_id
        self.lifetime = lifetime
        self.key = new_key()
        self.token_requests = 0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._address: Optional[tuple] = None

    # ---------------------------------------------------------------------------- addresses
    @property
    def base(self) -> str:
        host, port = self._address
        return f"http://{host}:{port}"

    @property
    def realm_uri(self) -> str:
        return f"{self.base}/realms/{self.realm}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.realm_uri}/protocol/openid-connect/token"

    def env(self) -> Dict[str, str]:
        """The environment that turns MONAI Label's authentication on against this issuer."""
        return {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": self.realm_uri,
                "MONAI_LABEL_AUTH_CLIENT_ID": self.client_id, "MONAI_LABEL_AUTH_TIMEOUT": "5"}

    # ------------------------------------------------------------------------------- tokens
    def token(self, username: str, roles: Optional[Iterable[str]] = None, lifetime: Optional[float] = None,
              key=None, algorithm: str = "RS256", **claims) -> str:
        """A signed access token (by default with this issuer's key and the user's roles)."""
        now = int(time.time())
        if roles is None:
            roles = self.users.get(username, ("", []))[1]
        payload = {
            "exp": now + int(self.lifetime if lifetime is None else lifetime), "iat": now, "iss": self.realm_uri,
            "aud": "account", "sub": f"user-{username}", "typ": "Bearer", "azp": self.client_id,
            "preferred_username": username, "email": f"{username}@hospital.example", "name": username.title(),
            "realm_access": {"roles": list(roles)},
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.key if key is None else key, algorithm=algorithm)

    # ------------------------------------------------------------------------------- server
    def start(self) -> "TokenIssuer":
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path.rstrip("/")
                realm = f"/realms/{issuer.realm}"
                if path == realm:
                    self._send(200, {"realm": issuer.realm, "public_key": public_key_b64(issuer.key),
                                     "token-service": f"{issuer.realm_uri}/protocol/openid-connect"})
                elif path == f"{realm}/.well-known/openid-configuration":
                    self._send(200, {"issuer": issuer.realm_uri, "token_endpoint": issuer.token_endpoint,
                                     "grant_types_supported": ["password"],
                                     "id_token_signing_alg_values_supported": ["RS256"]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
                if path != urllib.parse.urlsplit(issuer.token_endpoint).path:
                    return self._send(404, {"error": "not found"})
                issuer.token_requests += 1
                if form.get("grant_type") != "password":
                    return self._send(400, {"error": "unsupported_grant_type"})
                if form.get("client_id") != issuer.client_id:
                    return self._send(401, {"error": "invalid_client", "error_description": "Invalid client credentials"})
                user = issuer.users.get(form.get("username", ""))
                if user is None or user[0] != form.get("password"):
                    return self._send(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                token = issuer.token(form["username"])
                self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": issuer.lifetime,
                                 "scope": "profile email"})

        self._server = ThreadingHTTPServer(("127.0.0.1", self._address[1] if self._address else 0), Handler)
        self._address = self._server.server_address[:2]
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (a later :meth:`start` listens on the same port again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TokenIssuer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
