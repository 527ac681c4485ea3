"""The admin port (SPEC section 5): health, readiness, metrics, credential state and seeding."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import StoreError
from proxy.logs import event
from proxy.models import SUBJECT_RULE, ChainKey, Secret, subject_problem

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("authproxy.admin")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's own refusals (unknown path, wrong method) as JSON like every other error."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return web.json_response(
            {"error": "method_not_allowed", "message": f"{request.path} takes {allowed}"},
            status=405,
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        return _json_error(404, "not_found", f"no admin endpoint at {request.path}")


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/admin"):
        runtime = request.app[RUNTIME]
        expected = runtime.admin_token()
        if expected is not None:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.encode(), expected.encode()
            ):
                return web.json_response(
                    {
                        "error": "unauthorized",
                        "message": "send Authorization: Bearer <admin token>",
                    },
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="authproxy-admin"'},
                )
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    ready, checks = await request.app[RUNTIME].readiness()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics_text()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_credentials(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    creds = await runtime.credential_status()
    # Verification can never be off silently: routes without it are listed too.
    insecure = [r.name for r in runtime.config.routes if r.tls and r.tls.insecure_skip_verify]
    body: dict[str, object] = {"credentials": creds}
    if insecure:
        body["insecure_routes"] = insecure
    return web.json_response(body)


async def seed(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"]
    cred = runtime.config.credentials.get(name)
    if cred is None:
        return _json_error(404, "not_found", f"no credential named {name!r}")
    if cred.grant != "refresh_token":
        return _json_error(
            400, "bad_request", f"{name} uses {cred.grant}; only refresh_token chains are seeded"
        )
    try:
        body: Any = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        return _json_error(
            400, "bad_request", 'the body must be JSON: {"refresh_token": ..., "subject": ...}'
        )
    if not isinstance(body, dict):
        return _json_error(400, "bad_request", "the body must be a JSON object")
    token = body.get("refresh_token")
    subject = body.get("subject")
    if not isinstance(token, str) or not token.strip():
        return _json_error(400, "bad_request", "refresh_token must be a non-empty string")
    if subject is not None and not isinstance(subject, str):
        return _json_error(400, "bad_request", f"subject must be a string of {SUBJECT_RULE}")
    problem = subject_problem(name, cred.subject_header, subject, field="the subject")
    if problem:
        return _json_error(400, "bad_request", problem)
    unknown = set(body) - {"refresh_token", "subject"}
    if unknown:
        return _json_error(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        await runtime.seed(ChainKey(name, subject), Secret(token.strip()))
    except StoreError as exc:
        return _json_error(503, "store_unavailable", str(exc))
    event(
        log,
        logging.INFO,
        "seed",
        "chain seeded through the admin API",
        credential=name,
        subject_chain=subject is not None,
    )
    return web.Response(status=204)


async def refresh(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"]
    cred = runtime.config.credentials.get(name)
    if cred is None:
        return _json_error(404, "not_found", f"no credential named {name!r}")
    subject = request.query.get("subject")
    problem = subject_problem(name, cred.subject_header, subject, field="the subject")
    if problem:
        return _json_error(400, "bad_request", problem)
    started = runtime.refresh_now(ChainKey(name, subject))
    return web.json_response({"credential": name, "started": started}, status=202)


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[json_errors, admin_auth], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/credentials", list_credentials)
    app.router.add_put("/admin/credentials/{name}/refresh-token", seed)
    app.router.add_post("/admin/credentials/{name}/refresh", refresh)
    return app
