"""The Alexa bridge: ``POST /api/v1/alexa/smart-home`` (contract §6).

Why a router lives in ``bridges/``: the directive logic belongs to the Alexa bridge
(architecture: ``bridges/`` holds Alexa directives), yet Alexa reaches the hub over HTTP.
``api/`` may not import ``bridges/`` and ``bridges/`` may not import ``api/``, so this
module builds a plain FastAPI ``APIRouter`` over the hub, and the composition root
(``hexa serve``) hands it to ``create_app``, which mounts it under ``/api/v1`` beside the
REST routers. The route therefore shares the API's middleware (request ids, body limit,
HTTPS enforcement) and appears in ``/openapi.json``, while the bridge stays an extension
the API knows nothing about.

The route is not authenticated by an ``Authorization`` header: Alexa puts the linked
account's bearer token inside the directive (see :mod:`hexa.bridges.alexa_auth`). Every
answer is HTTP 200 with the event Alexa expects, errors included, since a skill's Lambda
passes the hub's answer to Alexa as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from hexa.bridges.alexa_directives import SmartHome

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

PATH = "/alexa/smart-home"


class AlexaMessage(BaseModel):
    """An event for Alexa: ``event`` (header, endpoint, payload) and, with state,
    ``context``. The full shape is Amazon's Smart Home message schema."""

    model_config = ConfigDict(extra="allow")

    event: dict[str, Any]
    context: dict[str, Any] | None = None


#: the request body as Alexa sends it, for the API document (the route reads raw bytes so
#: that a body which is not a directive is still answered the way Alexa expects)
DIRECTIVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["directive"],
    "properties": {
        "directive": {
            "type": "object",
            "required": ["header", "payload"],
            "properties": {
                "header": {
                    "type": "object",
                    "required": ["namespace", "name", "payloadVersion", "messageId"],
                    "properties": {
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                        "payloadVersion": {"type": "string", "enum": ["3"]},
                        "messageId": {"type": "string"},
                        "correlationToken": {"type": "string"},
                    },
                },
                "endpoint": {
                    "type": "object",
                    "properties": {
                        "endpointId": {"type": "string"},
                        "scope": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string", "enum": ["BearerToken"]},
                                "token": {"type": "string"},
                            },
                        },
                    },
                },
                "payload": {"type": "object"},
            },
        }
    },
}


class AlexaBridge:
    """Alexa Smart Home directives for one hub, served as an API router."""

    name = "alexa"

    def __init__(self, hub: Hub) -> None:
        self.smart_home = SmartHome(hub)

    def router(self) -> APIRouter:
        """The ``/alexa/smart-home`` route, for ``create_app(hub, routers=…)``."""
        router = APIRouter(tags=["alexa"])
        smart_home = self.smart_home

        @router.post(
            PATH,
            response_class=JSONResponse,
            responses={200: {"model": AlexaMessage, "description": "the event Alexa expects"}},
            summary="Answer an Alexa Smart Home directive",
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": DIRECTIVE_SCHEMA}},
                }
            },
        )
        async def alexa_smart_home(request: Request) -> JSONResponse:
            """Takes a directive exactly as Alexa sends it (the bearer token is in its
            scope) and answers the event Alexa expects, errors as an ErrorResponse with
            HTTP 200."""
            answer = await smart_home.handle(
                await request.body(), request_id=getattr(request.state, "request_id", None)
            )
            return JSONResponse(answer)

        return router
