"""The caller of a request as the audit log names them: ``ActorDep`` is the signed-in user
with source ``api`` and the request's id (the one answered in ``X-Request-ID``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hexa.api.deps import PrincipalDep
from hexa.api.errors import request_id_of
from hexa.hub.audit import Actor


async def request_actor(principal: PrincipalDep, request: Request) -> Actor:
    return Actor.user(principal.id, request_id_of(request))


ActorDep = Annotated[Actor, Depends(request_actor)]
