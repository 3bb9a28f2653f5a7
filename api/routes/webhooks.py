"""A tenant's webhook endpoints (Standard Webhooks): create (the `whsec_` secret is shown
once), list, delete, rotate the secret, and each endpoint's deliveries with their attempts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.schemas import WebhookAttemptOut, WebhookDeliveryOut, WebhookIn, WebhookOut
from api.webhooks import check_url, forbidden, literal_address
from db import webhooks
from db.tables import WebhookEndpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

EndpointId = Annotated[str, Path(max_length=64)]


def webhook_out(e: WebhookEndpoint, *, secret: bool = False) -> WebhookOut:
    return WebhookOut(id=e.id, url=e.url, events=list(e.events or []), created_at=e.created_at,
                      disabled_at=e.disabled_at, disabled_reason=e.disabled_reason,
                      secret=e.secret if secret else None)


def _found(session: SessionDep, endpoint_id: str, tenant: str) -> WebhookEndpoint:
    endpoint = webhooks.get(session, endpoint_id=endpoint_id, tenant=tenant)
    if endpoint is None:
        raise HTTPException(404, f"webhook {endpoint_id[:64]} not found")
    return endpoint


@router.post("", status_code=201, response_model=WebhookOut)
def create_webhook(body: WebhookIn, session: SessionDep, settings: SettingsDep,
                   principal: PrincipalDep) -> WebhookOut:
    """Deliveries of the events asked for go to `url`, signed with the secret in this
    answer (shown once; `rotate` makes a new one). The host is checked again on the address
    it resolves to at each send."""
    try:
        _, host, _ = check_url(body.url)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    # a literal address (any form) or localhost is refused now; a name is checked when it is
    # resolved, at each send
    address = literal_address(host)
    reason = forbidden(address) if address is not None else None
    if reason and not settings.webhook_allow_private:
        named = f" ({host} is {address})" if address != host else ""
        raise HTTPException(422, f"url: {reason}{named}; webhooks go to public addresses only (set "
                                 "CONVOY_WEBHOOK_ALLOW_PRIVATE=true to allow it)")
    if webhooks.count(session, tenant=principal.tenant) >= settings.max_webhooks_per_tenant:
        raise HTTPException(429, f"this tenant has {settings.max_webhooks_per_tenant} webhooks, "
                                 "the limit max_webhooks_per_tenant; delete one first",
                            headers={"Retry-After": "60"})
    endpoint = webhooks.create(session, tenant=principal.tenant, url=body.url,
                               events=sorted(set(body.events)))
    return webhook_out(endpoint, secret=True)


@router.get("", response_model=list[WebhookOut])
def list_webhooks(session: SessionDep, principal: PrincipalDep) -> list[WebhookOut]:
    return [webhook_out(e) for e in webhooks.of_tenant(session, tenant=principal.tenant)]


@router.get("/{webhook_id}", response_model=WebhookOut)
def get_webhook(webhook_id: EndpointId, session: SessionDep, principal: PrincipalDep
                ) -> WebhookOut:
    return webhook_out(_found(session, webhook_id, principal.tenant))


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: EndpointId, session: SessionDep, principal: PrincipalDep
                   ) -> None:
    """The endpoint and its deliveries (pending ones are not sent)."""
    if not webhooks.remove(session, endpoint_id=webhook_id, tenant=principal.tenant):
        raise HTTPException(404, f"webhook {webhook_id[:64]} not found")


@router.post("/{webhook_id}/rotate", response_model=WebhookOut)
def rotate_secret(webhook_id: EndpointId, session: SessionDep, principal: PrincipalDep
                  ) -> WebhookOut:
    """A new secret, in this answer only; every later attempt is signed with it."""
    endpoint = webhooks.rotate(session, endpoint_id=webhook_id, tenant=principal.tenant)
    if endpoint is None:
        raise HTTPException(404, f"webhook {webhook_id[:64]} not found")
    return webhook_out(endpoint, secret=True)


@router.get("/{webhook_id}/deliveries", response_model=list[WebhookDeliveryOut])
def list_deliveries(webhook_id: EndpointId, session: SessionDep, principal: PrincipalDep,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50
                    ) -> list[WebhookDeliveryOut]:
    """The newest deliveries first, each with every attempt: status, the start of the
    receiver's answer, or why nothing was sent."""
    _found(session, webhook_id, principal.tenant)
    out = []
    for d, tries in webhooks.deliveries(session, endpoint_id=webhook_id, limit=limit):
        out.append(WebhookDeliveryOut(
            id=d.id, event=d.event, job_id=d.job_id, state=d.state,  # type: ignore[arg-type]
            attempts=[WebhookAttemptOut(attempt=a.attempt, at=a.at, status=a.status,
                                        response=a.response, error=a.error,
                                        duration_seconds=a.duration_seconds) for a in tries],
            next_at=d.next_at if d.state == "pending" else None,
            created_at=d.created_at, finished_at=d.finished_at))
    return out


