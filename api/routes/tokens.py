"""Admin: create, list and revoke API tokens."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select

from api.auth import create_token, revoke_token
from api.deps import AdminDep, SessionDep
from api.schemas import TokenIn, TokenOut
from db.tables import Token

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


def token_out(t: Token, secret: str | None = None) -> TokenOut:
    return TokenOut(id=t.id, tenant=t.tenant, name=t.name, is_admin=t.is_admin,
                    created_at=t.created_at, revoked_at=t.revoked_at, token=secret)


@router.post("", status_code=201, response_model=TokenOut)
def create(body: TokenIn, session: SessionDep, admin: AdminDep) -> TokenOut:
    if not body.tenant or len(body.tenant) > 64 or not body.tenant.replace("-", "").replace(
            "_", "").isalnum():
        raise HTTPException(422, [{"loc": ["body", "tenant"], "type": "value_error",
                                   "msg": "tenant: 1-64 letters, digits, - or _"}])
    token, secret = create_token(session, tenant=body.tenant, name=body.name[:128],
                                 is_admin=body.admin)
    return token_out(token, secret)


@router.get("", response_model=list[TokenOut])
def list_tokens(session: SessionDep, admin: AdminDep) -> list[TokenOut]:
    return [token_out(t) for t in session.scalars(select(Token).order_by(Token.created_at))]


@router.delete("/{token_id}", response_model=TokenOut)
def revoke(token_id: str, session: SessionDep, admin: AdminDep) -> TokenOut:
    if not revoke_token(session, token_id=token_id):
        raise HTTPException(404, f"token {token_id[:64]} not found")
    token = session.get(Token, token_id)
    assert token is not None
    return token_out(token)
