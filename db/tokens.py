"""API tokens, stored by the sha256 of their secret (the secret itself never reaches the
database): create, look up, list, revoke, and the bootstrap admin's checks."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.ids import new_id
from db.tables import Token


class LastAdmin(RuntimeError):
    """Revoking this token would leave no active admin token: nobody could mint new ones."""


def create(session: Session, *, tenant: str, token_hash: str, name: str = "",
           is_admin: bool = False, scopes: str = "") -> Token:
    """Insert the token and commit."""
    token = Token(id=new_id(), tenant=tenant, name=name, token_hash=token_hash,
                  is_admin=is_admin, scopes=scopes, created_at=utcnow())
    session.add(token)
    session.commit()
    return token


def find_live(session: Session, *, token_hash: str) -> Token | None:
    """The token with this hash, unless it was revoked."""
    return session.scalars(
        select(Token).where(Token.token_hash == token_hash, Token.revoked_at.is_(None))
    ).one_or_none()


def exists(session: Session, *, token_hash: str) -> bool:
    """Whether a token with this hash was ever created (revoked or not)."""
    return session.scalars(
        select(Token.id).where(Token.token_hash == token_hash)).first() is not None


def has_live_admin(session: Session) -> bool:
    return session.scalars(select(Token.id).where(
        Token.is_admin.is_(True), Token.revoked_at.is_(None))).first() is not None


def oldest_first(session: Session) -> list[Token]:
    """Every token, revoked ones included, in the order they were created."""
    return list(session.scalars(select(Token).order_by(Token.created_at)))


def revoke(session: Session, *, token_id: str) -> Token | None:
    """Revoke (idempotent) and commit; None when there is no such token. Refuses with
    LastAdmin to revoke the only active admin token, which would lock every admin out."""
    token = session.get(Token, token_id)
    if token is None:
        return None
    if token.revoked_at is None:
        if token.is_admin:
            others = session.scalar(select(func.count()).select_from(Token).where(
                Token.is_admin.is_(True), Token.revoked_at.is_(None), Token.id != token.id))
            if not others:
                raise LastAdmin(f"token {token.id} is the last active admin token; create "
                                "another admin token first")
        token.revoked_at = utcnow()
        session.commit()
    return token
