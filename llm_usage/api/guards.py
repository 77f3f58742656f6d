"""Who may call a route: FastAPI dependencies that take the caller from a Bearer JWT.

Every `/v1` route takes its caller from a guard (`Member`, `TenantAdmin`, `PlatformAdmin`,
`GatewayCaller`) as its first parameter. FastAPI runs dependencies before it validates path and
query parameters, and the routes read their bodies themselves, so a request is judged in the
contract's order: authentication (401), then access (403), then parameters (422).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Final

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator

from llm_usage.api.auth import InvalidTokenError, Principal, Role
from llm_usage.api.context import api_context
from llm_usage.domain.policies import check_tenant_id

UI_TOKEN_COOKIE: Final = "llm_usage_token"  # noqa: S105 - a cookie name
UI_TOKEN_PARAMETER: Final = "token"  # noqa: S105 - a query parameter's name

_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT: `aud`, `exp`, `sub`, `role`, and `tenant_id` for the tenant roles.",
)
_UNAUTHENTICATED: Final = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def guard(
    role: Role, *, cookie: bool = False, link: bool = False, any_tenant: bool = False
) -> Callable[..., Awaitable[Principal]]:
    """The caller, if a valid token gives `role` on the path's tenant (with `any_tenant`, on
    whichever tenant it names: a route about no tenant's data); else 401 or 403. With
    `cookie`, a page for browsers also takes the token from the `UI_TOKEN_COOKIE` cookie (only
    pages that change nothing: a cookie is sent by the browser whoever made the request). With
    `link`, before the cookie, from a non-empty `token` query parameter: only the page that signs
    a browser in, which moves it to the cookie at once, so no other page leaves a JWT in the
    address bar (and in history and logs)."""

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        presented = credentials.credentials if credentials is not None else None
        if presented is None and link:
            presented = request.query_params.get(UI_TOKEN_PARAMETER) or None
        if presented is None and cookie:
            presented = request.cookies.get(UI_TOKEN_COOKIE)
        principal = _verified(request, presented)
        tenant_id = principal.tenant_id if any_tenant else request.path_params.get("tenant_id")
        if not principal.may(role, tenant_id):
            if principal.role.rank < role.rank:
                raise HTTPException(403, f"this needs the role {role.value} or above")
            raise HTTPException(403, "this token does not give access to this tenant")
        return principal

    authorize.__name__ = f"authorize_{role.name.lower()}"
    return authorize


def caller_of(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """The caller, if a valid Bearer token has one of exactly these `roles` (whatever its
    tenant: for routes that act for any tenant); else 401 or 403."""

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = _verified(request, credentials.credentials if credentials else None)
        if principal.role not in roles:
            names = " or ".join(role.value for role in roles)
            raise HTTPException(403, f"this needs the role {names}")
        return principal

    authorize.__name__ = "authorize_" + "_or_".join(role.name.lower() for role in roles)
    return authorize


def _verified(request: Request, presented: str | None) -> Principal:
    if presented is None:
        raise HTTPException(401, "send `Authorization: Bearer <JWT>`", headers=_UNAUTHENTICATED)
    try:
        return api_context(request).verifier.verify(presented)
    except InvalidTokenError as error:
        raise HTTPException(401, str(error), headers=_UNAUTHENTICATED) from None


Member = Annotated[Principal, Depends(guard(Role.TENANT_MEMBER))]
PageMember = Annotated[Principal, Depends(guard(Role.TENANT_MEMBER, cookie=True))]
SignInPageMember = Annotated[Principal, Depends(guard(Role.TENANT_MEMBER, cookie=True, link=True))]
TenantAdmin = Annotated[Principal, Depends(guard(Role.TENANT_ADMIN))]
PlatformAdmin = Annotated[Principal, Depends(guard(Role.PLATFORM_ADMIN))]
# The gateways' routes (ingest, budget checks): a gateway or a platform admin, for any tenant.
GatewayCaller = Annotated[Principal, Depends(caller_of(Role.GATEWAY, Role.PLATFORM_ADMIN))]
# Any valid token, whatever its role and tenant: for what every tenant shares (the price table).
AnyRole = Annotated[Principal, Depends(guard(Role.TENANT_MEMBER, any_tenant=True))]

TenantId = Annotated[
    str,
    Path(description="the tenant: 1-200 characters, no control characters or outer spaces"),
    AfterValidator(check_tenant_id),
]
