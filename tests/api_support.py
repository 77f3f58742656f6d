"""Tokens and an in-process client for the HTTP API's tests."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from llm_usage.api.app import create_app
from llm_usage.api.auth import TokenVerifier
from llm_usage.api.context import ApiContext, ApiMetrics
from llm_usage.core.settings import Settings
from tests.clock import now

SECRET = "a-development-secret-long-enough-for-hs256-and-hs512-0123456789abcdef"
AUDIENCE = "llm-usage-pipeline"


def token(
    role: str | None,
    tenant_id: Any = None,
    *,
    sub: str | None = "alice@example.com",
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    expires_in: float = 300,
    **claims: Any,
) -> str:
    """A signed JWT; None leaves a claim out, `claims` add or override any other."""
    payload: dict[str, Any] = {"aud": AUDIENCE, "exp": int(time.time() + expires_in)}
    if sub is not None:
        payload["sub"] = sub
    if role is not None:
        payload["role"] = role
    if tenant_id is not None:
        payload["tenant_id"] = tenant_id
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned_token(payload: dict[str, Any]) -> str:
    """`alg: none`: a token anyone can forge."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwks(*keys: tuple[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]) -> str:
    """A JWKS document of the public halves of (kid, private key) pairs."""
    entries = []
    for kid, private in keys:
        algorithm: Any = (
            jwt.algorithms.RSAAlgorithm
            if isinstance(private, rsa.RSAPrivateKey)
            else jwt.algorithms.ECAlgorithm
        )
        entry = json.loads(algorithm.to_jwk(private.public_key()))
        entry["kid"] = kid
        entries.append(entry)
    return json.dumps({"keys": entries})


@asynccontextmanager
async def api_client(
    pool: asyncpg.Pool,
    *,
    settings: Settings | None = None,
    clock: Callable[[], datetime] = now,
    verifier: TokenVerifier | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, ApiContext]]:
    """The app in this process over `pool`, and an HTTP client that calls it; its clock is the
    tests' now unless `clock` says otherwise."""
    context = ApiContext(
        settings=settings or Settings(),
        pool=pool,
        verifier=verifier or TokenVerifier.from_secret(SECRET, audience=AUDIENCE),
        metrics=ApiMetrics(CollectorRegistry()),
        clock=clock,
    )
    transport = httpx.ASGITransport(app=create_app(context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client, context
    finally:
        await context.close()
