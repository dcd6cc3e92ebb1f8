"""Authentication with MONAI Label's settings, as MONAI Label 0.8.5 meant it to work.

MONAI Label 0.8.5 calls PyJWT 2 without the ``algorithms`` argument, which refuses every token.
With authentication on, this module checks tokens itself through FastAPI's
``dependency_overrides`` of MONAI Label's ``get_current_user``, with the same claims and roles,
asymmetric signatures only and ``exp`` required; and ``POST /auth/token`` answers a wrong password
with ``401`` and an unreachable login service with ``503`` (not ``500``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import Depends, HTTPException
from fastapi.security import OAuth2PasswordRequestForm
from starlette.concurrency import run_in_threadpool

from monailabel.config import settings
from monailabel.endpoints.user.auth import User

logger = logging.getLogger(__name__)

_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def _login_service_down(e: BaseException) -> HTTPException:
    logger.error("login service %s unreachable: %s", settings.MONAI_LABEL_AUTH_REALM_URI, e)
    return HTTPException(status_code=503, detail="the login service cannot be reached to check the credentials; try "
                                                 "again later or ask the administrator", headers={"Retry-After": "10"})


def user_from_token(token: str, key: str) -> User:
    """The user a token names, with MONAI Label's claims (``MONAI_LABEL_AUTH_TOKEN_*``).

    Raises:
        jwt.InvalidTokenError: bad signature, symmetric or no algorithm, expired, no ``exp``.
    """
    import jwt

    payload = jwt.decode(token, key, algorithms=_TOKEN_ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []

    def text(claim: str) -> Optional[str]:
        value = payload.get(claim)
        return str(value) if value is not None else None

    username = text(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or text("sub") or ""
    return User(username=username, email=text(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=text(settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=roles)


def install_auth(app):
    """With MONAI Label's authentication on: its ``get_current_user`` dependency replaced by
    token checks of :func:`user_from_token` (``app.dependency_overrides``); returns the endpoint
    of ``POST /auth/token``. With authentication off: changes nothing and returns ``None``."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    import jwt
    import requests
    from monailabel.endpoints.user import auth

    async def current_user(token: str = Depends(auth.oauth2_scheme)) -> User:
        try:
            key = await run_in_threadpool(auth.get_public_key, settings.MONAI_LABEL_AUTH_REALM_URI)
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            raise _login_service_down(e) from None
        try:
            return user_from_token(token, key)
        except jwt.InvalidTokenError as e:
            logger.info("refused a token: %s", e)
            raise HTTPException(status_code=401, detail=f"invalid or expired token ({str(e)[:100]}); log in again",
                                headers={"WWW-Authenticate": "Bearer"}) from None

    app.dependency_overrides[auth.get_current_user] = current_user

    async def access_token(form_data: OAuth2PasswordRequestForm = Depends()):
        def ask():
            return requests.post(auth.token_uri(), timeout=settings.MONAI_LABEL_AUTH_TIMEOUT, data={
                "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": form_data.username,
                "password": form_data.password, "grant_type": "password"})

        try:
            r = await run_in_threadpool(ask)
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            raise _login_service_down(e) from None
        if r.status_code in (400, 401, 403):
            raise HTTPException(status_code=401, detail="wrong user name or password", headers={"WWW-Authenticate": "Bearer"})
        try:
            payload = r.json() if r.status_code == 200 else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("access_token"), str):
            raise _login_service_down(f"token endpoint answered {r.status_code}")
        return {"access_token": payload["access_token"], "token_type": payload.get("token_type") or "bearer"}

    return access_token
