"""Who is calling: Bearer JWTs checked against the configured keys, and what each role may do.

A token is valid only if its signature verifies with a configured key under an accepted
algorithm (HS256 with `API_JWT_SECRET`, or RS256/ES256 with a key of `API_JWT_JWKS_FILE`; never
`none`), it has not expired (`exp` is required), its `aud` is `API_JWT_AUDIENCE`, its `sub` names
the caller, its `role` is one of the four roles, and a tenant role names its `tenant_id` (a
gateway acts for any tenant, so a `tenant_id` on its token is ignored).
Anything else is an `InvalidTokenError` (401). A valid token that may not do what it asks is a
matter of `Principal.may` (403).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import jwt

from llm_usage.core.errors import ConfigurationError
from llm_usage.core.settings import Settings
from llm_usage.domain.policies import InvalidPolicyError, check_tenant_id

# A shorter HMAC key can be brute-forced offline from any one token (RFC 7518, section 3.2).
MIN_SECRET_BYTES: Final = 32
MAX_SUBJECT_CHARS: Final = 200
JWKS_ALGORITHMS: Final = ("RS256", "ES256")
MAX_VERIFIED_TOKENS: Final = 10_000
SECRET_ALGORITHM: Final = "HS256"  # noqa: S105 - an algorithm name


class Role(StrEnum):
    # The LLM gateway: ingest and budget checks for any tenant, and nothing else.
    GATEWAY = "gateway"
    TENANT_MEMBER = "tenant-member"
    TENANT_ADMIN = "tenant-admin"
    PLATFORM_ADMIN = "platform-admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]


# The gateway ranks below a member: it reads nothing, so every route guarded by rank refuses it.
_RANKS = {Role.GATEWAY: 0, Role.TENANT_MEMBER: 1, Role.TENANT_ADMIN: 2, Role.PLATFORM_ADMIN: 3}


class InvalidTokenError(Exception):
    """The request is not authenticated; the message says why (safe to show the caller)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a valid token names."""

    subject: str
    role: Role
    tenant_id: str | None  # None for a platform admin and a gateway

    def may(self, role: Role, tenant_id: str | None) -> bool:
        """Whether this caller has at least `role` on `tenant_id` (None: no tenant involved,
        which only a platform admin may use)."""
        if self.role is Role.PLATFORM_ADMIN:
            return True
        return tenant_id is not None and tenant_id == self.tenant_id and self.role.rank >= role.rank

    @property
    def is_gateway_caller(self) -> bool:
        """Whether this caller may ingest and check budgets for any tenant."""
        return self.role in (Role.GATEWAY, Role.PLATFORM_ADMIN)


@dataclass(frozen=True)
class _Key:
    key: Any
    algorithm: str


class TokenVerifier:
    """Checks Bearer tokens against one key source: a shared secret or a JWKS file."""

    def __init__(self, *, audience: str, keys: dict[str | None, _Key]) -> None:
        self._audience = audience
        # By `kid`; the key under None is used for a token without `kid` (one key configured).
        self._keys = keys
        # Tokens already verified, until their `exp`: a portal sends the same token with every
        # request, and checking a signature costs more than the rest of a small request.
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_secret(cls, secret: str, *, audience: str) -> TokenVerifier:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"API_JWT_SECRET is {len(secret.encode())} bytes; an HS256 secret needs at least "
                f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
            )
        return cls(audience=audience, keys={None: _Key(secret, SECRET_ALGORITHM)})

    @classmethod
    def from_jwks(
        cls, text: str, *, audience: str, source: str = "API_JWT_JWKS_FILE"
    ) -> TokenVerifier:
        try:
            document = json.loads(text)
            entries = document["keys"]
            if not isinstance(entries, list) or not entries:
                raise ValueError("`keys` is not a non-empty list")
            keys = [jwt.PyJWK.from_dict(entry) for entry in entries]
        except (ValueError, KeyError, TypeError, jwt.PyJWTError) as error:
            raise ConfigurationError(
                f"{source} is not a usable JWKS ({type(error).__name__}: {error}); give a JSON "
                'document {"keys": [...]} of RS256 or ES256 public keys'
            ) from None
        by_kid: dict[str | None, _Key] = {}
        for found in keys:
            if found.algorithm_name not in JWKS_ALGORITHMS:
                raise ConfigurationError(
                    f"{source}: key {found.key_id!r} is for {found.algorithm_name}; only "
                    f"{' and '.join(JWKS_ALGORITHMS)} keys are accepted"
                )
            if hasattr(found.key, "private_numbers"):
                raise ConfigurationError(
                    f"{source}: key {found.key_id!r} is a private key; give only public keys"
                )
            if found.key_id in by_kid:
                raise ConfigurationError(f"{source}: two keys have the kid {found.key_id!r}")
            by_kid[found.key_id] = _Key(found.key, found.algorithm_name)
        if len(by_kid) == 1:
            by_kid.setdefault(None, next(iter(by_kid.values())))
        return cls(audience=audience, keys=by_kid)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The verifier the settings configure; no key, or two kinds of key, is one line."""
        secret = settings.api_jwt_secret.get_secret_value() if settings.api_jwt_secret else ""
        jwks_file = settings.api_jwt_jwks_file
        if secret and jwks_file:
            raise ConfigurationError(
                "both API_JWT_SECRET and API_JWT_JWKS_FILE are set; set one: the secret (HS256) "
                "for development, the JWKS file (RS256/ES256) in production"
            )
        if secret:
            return cls.from_secret(secret, audience=settings.api_jwt_audience)
        if jwks_file:
            try:
                text = Path(jwks_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigurationError(
                    f"API_JWT_JWKS_FILE={jwks_file!r} cannot be read ({error}); point it at the "
                    "JWKS file of the token issuer's public keys"
                ) from None
            return cls.from_jwks(text, audience=settings.api_jwt_audience)
        raise ConfigurationError(
            "no key to check API tokens with: set API_JWT_JWKS_FILE (RS256/ES256 public keys) or, "
            "for development, API_JWT_SECRET (HS256, at least 32 bytes)"
        )

    def verify(self, token: str) -> Principal:
        """The caller `token` names, or InvalidTokenError."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]
        principal, expires_at = self._verify(token)
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            self._verified.clear()
        self._verified[token] = (principal, expires_at)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"malformed token: {error}") from None
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) or kid is None else None
        if key is None:
            raise InvalidTokenError("the token's key (kid) is not one of the configured keys")
        if header.get("alg") != key.algorithm:
            raise InvalidTokenError(
                f"the token is signed with {header.get('alg')!r}; this key accepts {key.algorithm}"
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                options={"require": ["exp", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError("the token is not for this audience") from None
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"invalid token: {error}") from None
        return _principal(claims), float(claims["exp"])


def _principal(claims: dict[str, Any]) -> Principal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise InvalidTokenError(f"`sub` must be 1 to {MAX_SUBJECT_CHARS} characters")
    if "\x00" in subject:
        raise InvalidTokenError("`sub` must not contain NUL")
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise InvalidTokenError(
            f"`role` must be one of {', '.join(r.value for r in Role)}"
        ) from None
    if role in (Role.PLATFORM_ADMIN, Role.GATEWAY):
        return Principal(subject=subject, role=role, tenant_id=None)
    try:
        tenant_id = check_tenant_id(claims.get("tenant_id"))
    except InvalidPolicyError as error:
        raise InvalidTokenError(
            f"a {role.value} token needs a valid `tenant_id`: {error}"
        ) from None
    return Principal(subject=subject, role=role, tenant_id=tenant_id)
