"""The explanation viewer: a page of Sightline's own, served over HTTP by the gateway process.

It lives in the gateway because everything it needs is already there: the tenant-scoped reads of the explanation
broker, the Authenticator (with its key file reloading), the tenant rate limits, and the vLLM client that names
token ids the explanation does not hold. It authenticates exactly as
the gRPC API does: the page sends ``Authorization: Bearer <key>`` on its data requests and the gateway's
``Authenticator`` resolves the tenant, so without a valid key there is no data, and a tenant sees only its own
explanations (another tenant's id is 404, as it is NOT_FOUND over gRPC). The page itself (HTML, CSS, JS shipped
in ``static/``) holds no data and loads nothing from elsewhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import orjson
from aiohttp import web

from server.auth import Authenticator
from server.errors import GatewayError, invalid_argument
from server.explanations import ExplanationBroker
from server.limits import Tenant, TenantLimiter
from server.metrics import VIEWER_REQUESTS
from server.viewer.payload import explanation_payload, summary_payload
from server.viewer.token_texts import MAX_IDS_PER_REQUEST, TokenTexts

STATIC = Path(__file__).parent / "static"
PAGE_SIZE = 50
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Nothing on the page comes from elsewhere, and it is framed nowhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request, Tenant], Awaitable[web.StreamResponse]]


class Viewer:
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: TenantLimiter,
        broker: ExplanationBroker,
        token_texts: TokenTexts,
        *,
        trace_url_template: str,
    ) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._broker = broker
        self._token_texts = token_texts
        self._trace_url_template = trace_url_template

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers])
        app.router.add_get("/", _page)
        app.router.add_get("/explanations/{explanation_id}", _page)
        app.router.add_static("/static", STATIC)
        app.router.add_get("/api/explanations", self._data("list", self._list))
        app.router.add_get("/api/explanations/{explanation_id}", self._data("get", self._get))
        app.router.add_get("/api/token-texts", self._data("token-texts", self._texts))
        return app

    def _data(self, endpoint: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Authenticate and rate-limit like a gRPC call, then answer; errors as JSON with the gRPC message."""

        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                tenant = self._authenticator.authenticate(_metadata(request))
                await self._limiter.admit_request(tenant)
                response = await handler(request, tenant)
            except GatewayError as exc:
                response = web.json_response(
                    {"error": exc.message, "code": exc.code.name}, status=HTTP_STATUS.get(exc.code, 500)
                )
            VIEWER_REQUESTS.labels(endpoint, str(response.status)).inc()
            return response

        return answer

    async def _list(self, request: web.Request, tenant: Tenant) -> web.StreamResponse:
        summaries, next_page_token = await self._broker.list_summaries(
            tenant.name, PAGE_SIZE, request.query.get("page_token", "")
        )
        return web.json_response(
            {
                "tenant": tenant.name,
                "explanations": [summary_payload(s) for s in summaries],
                "next_page_token": next_page_token,
            }
        )

    async def _get(self, request: web.Request, tenant: Tenant) -> web.StreamResponse:
        explanation = await self._broker.get(request.match_info["explanation_id"], tenant.name)
        return web.json_response(explanation_payload(explanation, self._trace_url_template), dumps=_json)

    async def _texts(self, request: web.Request, tenant: Tenant) -> web.StreamResponse:
        model = request.query.get("model", "")
        try:
            ids = [int(i) for i in request.query.get("ids", "").split(",") if i]
        except ValueError:
            raise invalid_argument("ids must be comma-separated token ids") from None
        if not model or len(ids) > MAX_IDS_PER_REQUEST:
            raise invalid_argument(f"name the model and at most {MAX_IDS_PER_REQUEST} ids")
        texts = await self._token_texts.texts(model, ids)
        return web.json_response({"texts": {str(i): text for i, text in texts.items()}})


def _json(value: object) -> str:
    # orjson: a long explanation's payload is megabytes.
    return orjson.dumps(value).decode()


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    """The HTTP Authorization header as the gRPC metadata the Authenticator reads."""
    header = request.headers.get("Authorization")
    return [] if header is None else [("authorization", header)]


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


async def start_viewer(viewer: Viewer, host: str, port: int) -> web.AppRunner:
    """Serve the viewer on host:port until the returned runner is cleaned up."""
    runner = web.AppRunner(viewer.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
