"""Admin: create, list and revoke API tokens. The secret is shown once, in the create reply;
the database keeps only its sha256."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from api.auth import create_token
from api.deps import AdminDep, SessionDep
from api.schemas import TokenIn, TokenOut, TokenRevokedOut
from db import tokens
from db.tables import Token

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])

TokenId = Annotated[str, Path(max_length=64)]


def token_out(t: Token, secret: str | None = None) -> TokenOut:
    return TokenOut(id=t.id, tenant=t.tenant, name=t.name, is_admin=t.is_admin,
                    scopes=(t.scopes or "").split(), created_at=t.created_at,
                    revoked_at=t.revoked_at, token=secret)


@router.post("", status_code=201, response_model=TokenOut)
def create(body: TokenIn, session: SessionDep, admin: AdminDep) -> TokenOut:
    token, secret = create_token(session, tenant=body.tenant, name=body.name,
                                 is_admin=body.admin, scopes=tuple(body.scopes))
    return token_out(token, secret)


@router.get("", response_model=list[TokenOut])
def list_tokens(session: SessionDep, admin: AdminDep) -> list[TokenOut]:
    return [token_out(t) for t in tokens.oldest_first(session)]


@router.delete("/{token_id}", response_model=TokenRevokedOut)
def revoke(token_id: TokenId, session: SessionDep, admin: AdminDep) -> TokenRevokedOut:
    """Revoke a token (again is fine). An admin token may revoke itself, unless it is the last
    active admin token (409); the answer then says so (`revoked_self`), since that request
    was its last."""
    try:
        token = tokens.revoke(session, token_id=token_id)
    except tokens.LastAdmin as exc:
        raise HTTPException(409, str(exc)) from None
    if token is None:
        raise HTTPException(404, f"token {token_id[:64]} not found")
    own = token.id == admin.token_id
    message = (f"token {token.id} revoked; it is the token this request was made with, so "
               "it no longer authenticates (this answer is the last it gets)" if own
               else f"token {token.id} revoked")
    return TokenRevokedOut(**token_out(token).model_dump(), revoked_self=own, message=message)
