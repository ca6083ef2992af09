"""HTTP and gRPC adapters of the serving core: domain errors mapped once, request limits.

    to_domain(exc)    any exception -> the P5RayError a client should see (or None: internal)
    make_api(title)   the FastAPI app: 413 body limit, 422 without echoing input, domain errors
    answer_grpc(...)  validate a gRPC message, run one core method, map errors to a status code

The status codes live on the error classes (`errors.py`: http_status, grpc_code); this module
only reads them, so HTTP and gRPC can never disagree about what an error is.
"""

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from p5ray.errors import InvalidRequestError, OverloadedError, P5RayError
from p5ray.schemas import from_proto, to_proto

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 2 * 1024 * 1024  # a 10,000-id history fits many times; 10 MB does not


def to_domain(exc: BaseException) -> P5RayError | None:
    """The domain error behind `exc`, unwrapping Ray's transport; None for internal failures."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, P5RayError):
        return exc
    if isinstance(exc, ValidationError):
        return InvalidRequestError(validation_message(exc.errors(include_input=False)))
    if isinstance(exc, BackPressureError | DeploymentUnavailableError):
        return OverloadedError("the server is over capacity; retry with backoff")
    if isinstance(exc, RayActorError):  # a replica died twice in one request (serve.call_task retried once)
        return OverloadedError("a serving replica failed while answering; retry")
    return None


def validation_message(errors) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:5]]
    return "; ".join(parts)


def validation_detail(errors) -> list[dict]:
    """FastAPI's 422 detail without `input` (never echo a 100,000-item body) or `ctx`."""
    return [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors[:20]]


# -- HTTP ---------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"request body is over the limit of {self.max_bytes} bytes"

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": self._detail()}, status_code=413, headers={"connection": "close"})
        await response(scope, receive, send)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    error = to_domain(exc)
    if error is None:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)
    return JSONResponse({"detail": error.one_line()}, status_code=error.http_status)


async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's HTTP errors as they are, except FastAPI's 400 for a body it cannot parse at
    all (invalid UTF-8, JSON nested too deep, a number too long): bad input, so 422 like the rest."""
    status = 422 if exc.status_code == 400 else exc.status_code
    return JSONResponse({"detail": exc.detail}, status_code=status, headers=getattr(exc, "headers", None))


def make_api(title: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    api = FastAPI(
        title=title,
        version="v1",
        description="p5ray recommender: recall -> rank -> cross-sell, and each task alone. "
        "The same API over gRPC: serve/p5ray.proto (package p5ray.v1).",
    )
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    api.add_exception_handler(RequestValidationError, _request_invalid)
    api.add_exception_handler(HTTPException, _http_error)
    for kind in (P5RayError, RayTaskError, RayActorError, BackPressureError, DeploymentUnavailableError):
        api.add_exception_handler(kind, _domain_error)
    return api


# -- gRPC ---------------------------------------------------------------------------------------


async def answer_grpc(core, request_model, message, response_cls, grpc_context):
    """One RPC: message -> request model -> `await core(request)` -> response message.

    Domain errors set the status code (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE) and details
    and return an empty message, which is how Ray Serve's gRPC proxy carries a status.
    """
    try:
        answer = await core(from_proto(request_model, message))
        return to_proto(answer, response_cls)
    except Exception as exc:
        error = to_domain(exc)
        if error is None:
            raise
        grpc_context.set_code(getattr(grpc.StatusCode, error.grpc_code))
        grpc_context.set_details(error.one_line())
        return response_cls()
