"""Token checks: which keys and claims make a caller, and what each role may do."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NoReturn

import jwt
import pytest

from llm_usage.api.auth import InvalidTokenError, Principal, Role, TokenVerifier
from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from tests.api_support import AUDIENCE, SECRET, ec_key, jwks, rsa_key, token, unsigned_token

HS = TokenVerifier.from_secret(SECRET, audience=AUDIENCE)


def test_a_valid_tenant_token_names_its_caller() -> None:
    assert HS.verify(token("tenant-admin", "acme", sub="bob")) == Principal(
        subject="bob", role=Role.TENANT_ADMIN, tenant_id="acme"
    )


def test_a_platform_admin_belongs_to_no_tenant() -> None:
    principal = HS.verify(token("platform-admin", "acme"))
    assert principal.tenant_id is None
    assert principal.may(Role.PLATFORM_ADMIN, None)
    assert principal.may(Role.TENANT_ADMIN, "any-tenant")


@pytest.mark.parametrize("tenant_claim", [None, "acme", ""])
def test_a_gateway_token_needs_no_tenant_and_any_tenant_it_names_is_ignored(
    tenant_claim: str | None,
) -> None:
    principal = HS.verify(token("gateway", tenant_claim, sub="gw-1"))
    assert principal == Principal(subject="gw-1", role=Role.GATEWAY, tenant_id=None)
    assert principal.is_gateway_caller


@pytest.mark.parametrize("needed", list(Role))
@pytest.mark.parametrize("tenant", ["acme", None])
def test_a_gateway_may_read_or_change_nothing_by_rank(needed: Role, tenant: str | None) -> None:
    assert not HS.verify(token("gateway", "acme")).may(needed, tenant)


@pytest.mark.parametrize(
    ("role", "tenant", "gateway_caller"),
    [
        ("gateway", None, True),
        ("platform-admin", None, True),
        ("tenant-admin", "acme", False),
        ("tenant-member", "acme", False),
    ],
)
def test_only_gateways_and_platform_admins_are_gateway_callers(
    role: str, tenant: str | None, gateway_caller: bool
) -> None:
    assert HS.verify(token(role, tenant)).is_gateway_caller is gateway_caller


@pytest.mark.parametrize(
    ("role", "needed", "tenant", "allowed"),
    [
        ("tenant-member", Role.TENANT_MEMBER, "acme", True),
        ("tenant-member", Role.TENANT_ADMIN, "acme", False),
        ("tenant-admin", Role.TENANT_ADMIN, "acme", True),
        ("tenant-admin", Role.TENANT_MEMBER, "acme", True),
        ("tenant-admin", Role.TENANT_MEMBER, "globex", False),
        ("tenant-admin", Role.PLATFORM_ADMIN, None, False),
        ("tenant-admin", Role.TENANT_MEMBER, None, False),
    ],
)
def test_what_a_tenant_role_may_do(
    role: str, needed: Role, tenant: str | None, allowed: bool
) -> None:
    assert HS.verify(token(role, "acme")).may(needed, tenant) is allowed


@pytest.mark.parametrize(
    ("made", "why"),
    [
        (lambda: token("platform-admin", expires_in=-1), "expired"),
        (lambda: token("platform-admin", aud="other"), "audience"),
        (lambda: token("platform-admin", key="x" * 64), "Signature"),
        (lambda: token("platform-admin", algorithm="HS384"), "HS384"),
        (lambda: token("platform-admin", sub=None), "sub"),
        (lambda: token("platform-admin", sub=""), "sub"),
        (lambda: token("platform-admin", sub="x" * 201), "sub"),
        (lambda: token("root"), "role"),
        (lambda: token("tenant-member"), "tenant_id"),
        (lambda: token("tenant-member", " acme"), "tenant_id"),
        (lambda: token("platform-admin", headers={"kid": "k9"}), "kid"),
        (
            lambda: unsigned_token({"aud": AUDIENCE, "exp": 2**40, "sub": "m", "role": "x"}),
            "none",
        ),
        (lambda: "a.b.c", "malformed"),
    ],
)
def test_invalid_tokens_say_why(made: object, why: str) -> None:
    assert callable(made)
    with pytest.raises(InvalidTokenError, match=why):
        HS.verify(made())


def test_rs256_and_es256_tokens_verify_with_their_public_keys_by_kid() -> None:
    rsa, ec = rsa_key(), ec_key()
    verifier = TokenVerifier.from_jwks(jwks(("r1", rsa), ("e1", ec)), audience=AUDIENCE)
    rs = token("tenant-member", "acme", key=rsa, algorithm="RS256", headers={"kid": "r1"})
    es = token("tenant-member", "acme", key=ec, algorithm="ES256", headers={"kid": "e1"})
    assert verifier.verify(rs).tenant_id == "acme"
    assert verifier.verify(es).tenant_id == "acme"
    # The RSA key's token under the EC key's kid, a kid-less token with two keys, and a token
    # HMAC-signed with the RSA public key's PEM (the algorithm confusion attack) are refused.
    swapped = token("tenant-member", "acme", key=rsa, algorithm="RS256", headers={"kid": "e1"})
    for bad in (swapped, token("tenant-member", "acme", key=rsa, algorithm="RS256")):
        with pytest.raises(InvalidTokenError):
            verifier.verify(bad)
    with pytest.raises(InvalidTokenError):
        verifier.verify(token("platform-admin", headers={"kid": "r1"}, key=SECRET))


def test_one_jwks_key_also_verifies_tokens_without_kid() -> None:
    ec = ec_key()
    verifier = TokenVerifier.from_jwks(jwks(("only", ec)), audience=AUDIENCE)
    assert verifier.verify(token("platform-admin", key=ec, algorithm="ES256")).subject


def test_secret_tokens_are_refused_by_a_jwks_verifier() -> None:
    verifier = TokenVerifier.from_jwks(jwks(("only", rsa_key())), audience=AUDIENCE)
    with pytest.raises(InvalidTokenError, match="HS256"):
        verifier.verify(token("platform-admin"))


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({}, "no key to check API tokens with"),
        ({"api_jwt_secret": "short"}, "needs at least 32"),
        ({"api_jwt_secret": SECRET, "api_jwt_jwks_file": "x"}, "both"),
        ({"api_jwt_jwks_file": "/nonexistent/jwks.json"}, "cannot be read"),
    ],
)
def test_key_configuration_mistakes_are_one_line(environment: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        TokenVerifier.from_settings(Settings(**environment))  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not a usable JWKS"),
        ('{"keys": []}', "not a usable JWKS"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "only RS256 and ES256"),
    ],
)
def test_a_bad_jwks_file_is_one_line(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(document, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=message) as raised:
        TokenVerifier.from_settings(Settings(api_jwt_jwks_file=str(path)))
    assert "\n" not in str(raised.value)


def test_a_jwks_with_a_private_key_is_refused(tmp_path: Path) -> None:
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [private]}), encoding="utf-8")
    with pytest.raises(ConfigurationError, match="private key"):
        TokenVerifier.from_settings(Settings(api_jwt_jwks_file=str(path)))


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier.from_secret(SECRET, audience=AUDIENCE)
    valid = token("tenant-member", "acme", expires_in=60)
    assert verifier.verify(valid).tenant_id == "acme"

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise jwt.ExpiredSignatureError("expired")

    monkeypatch.setattr(jwt, "decode", refuse)
    assert verifier.verify(valid).tenant_id == "acme"  # from memory: not decoded again
    later = time.time() + 61
    monkeypatch.setattr("llm_usage.api.auth.time.time", lambda: later)
    with pytest.raises(InvalidTokenError, match="expired"):
        verifier.verify(valid)  # past its exp: checked again, and refused
