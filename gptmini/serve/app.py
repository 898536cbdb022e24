"""The FastAPI app: the page, /health, /v1/models, /v1/completions and /v1/chat/completions.

One concern: HTTP. Bodies are read with a size limit and checked by ``protocol``; generation happens in the
``engine``'s thread, whose events come back through an asyncio queue per request. Every failure a client can
cause is OpenAI's error object with a 4xx status; a bug is a 500 with the same shape, never a dropped
connection. A streamed reply whose client goes away cancels its request, which frees its slot before the
engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptmini.serve.engine import Engine, Event, Job
from gptmini.serve.protocol import (
    ApiError,
    GenerationRequest,
    Limits,
    chunk,
    parse_chat,
    parse_completion,
    parse_json,
    reply,
    usage,
    usage_chunk,
)


@dataclass
class Site:
    """What the app serves and its rules (from ServeConfig)."""

    engine: Engine
    limits: Limits
    model_id: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576


def page_html() -> str:
    """The chat page, shipped inside the package."""
    return resources.files("gptmini.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(site: Site) -> FastAPI:
    app = FastAPI(title="gptmini", docs_url=None, redoc_url=None, openapi_url=None)
    page = page_html()
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:  # 404, 405 in OpenAI's shape
        return JSONResponse(
            ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code
        )

    @app.exception_handler(Exception)
    async def bug(_: Request, error: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = site.engine
        state = {"status": "closing" if engine.closing else "ok", "model": site.model_id}
        state.update(active=engine.active, waiting=len(engine.waiting), max_batch=engine.max_batch)
        return JSONResponse(state, status_code=503 if engine.closing else 200)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(site.api_key))])

    @v1.get("/models")
    async def models() -> dict:
        model = {"id": site.model_id, "object": "model", "created": created, "owned_by": "gptmini"}
        return {"object": "list", "data": [model]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _generate(site, request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(site, request, chat=True)

    app.include_router(v1)
    if site.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(site.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _key_check(api_key: str | None):
    """The /v1 dependency: with a key set, ``Authorization: Bearer <key>`` or a 401."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            what = "a wrong API key" if given else "no API key"
            raise ApiError(
                401,
                f"this server needs an API key and the request has {what}; send the header "
                "'Authorization: Bearer <key>' (the openai client's api_key).",
                kind="authentication_error",
                code="invalid_api_key",
            )

    return check


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes."""
    too_big = ApiError(
        413,
        f"the request body is larger than this server's limit of {limit:,} bytes (max_body_bytes).",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _generate(site: Site, request: Request, chat: bool) -> Response:
    body = parse_json(await _read_body(request, site.max_body_bytes))
    spec = (parse_chat if chat else parse_completion)(body, site.limits)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # called in the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is gone, nobody is listening
            pass

    job = site.engine.submit(spec, sink)
    reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    shape = _Shape(reply_id, int(time.time()), site.model_id, chat)
    if spec.stream:
        stream = _stream(site.engine, job, spec, events, shape)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    return await _whole(site.engine, job, events, shape, request)


@dataclass
class _Shape:
    """What every piece of one reply repeats."""

    id: str
    created: int
    model: str
    chat: bool


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _next(events: asyncio.Queue[Event]) -> Event:
    """The next event, with every other one already waiting folded into it (one write instead of many)."""
    event = await events.get()
    while event.finish_reason is None and not events.empty():
        later = events.get_nowait()
        later.text = event.text + later.text
        event = later
    return event


async def _stream(
    engine: Engine, job: Job, spec: GenerationRequest, events: asyncio.Queue[Event], shape: _Shape
) -> AsyncIterator[str]:
    """Server-sent events: OpenAI chunks, the last with finish_reason and usage, then ``data: [DONE]``."""
    s = shape
    try:
        if s.chat:
            yield _sse(chunk(s.id, s.created, s.model, True, "", first=True))  # the role comes first
        while True:
            event = await _next(events)
            if event.error is not None:
                error = ApiError(500, f"generation failed: {event.error}", kind="server_error")
                yield _sse(error.body())
                break
            if event.finish_reason is None:
                yield _sse(chunk(s.id, s.created, s.model, s.chat, event.text))
                continue
            if event.text:
                yield _sse(chunk(s.id, s.created, s.model, s.chat, event.text))
            used = usage(event.prompt_tokens, event.completion_tokens)
            yield _sse(chunk(s.id, s.created, s.model, s.chat, None, event.finish_reason, used))
            if spec.include_usage:
                yield _sse(usage_chunk(s.id, s.created, s.model, s.chat, used))
            break
        yield _sse("[DONE]")
    finally:
        if job.finish_reason is None:  # the client went away (or the stream was cancelled) mid-reply
            engine.cancel(job)


async def _whole(
    engine: Engine, job: Job, events: asyncio.Queue[Event], shape: _Shape, request: Request
) -> Response:
    """The reply in one piece; a client that disconnects while it waits cancels the request."""
    watch = asyncio.create_task(_cancel_on_disconnect(request, engine, job))
    pieces = []
    try:
        while True:
            event = await events.get()
            pieces.append(event.text)
            if event.finish_reason is not None:
                break
    finally:
        watch.cancel()
        if job.finish_reason is None:
            engine.cancel(job)
    if event.finish_reason == "cancelled":
        return Response(status_code=499)  # the client has gone: nobody reads this
    if event.error is not None:
        raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
    if event.finish_reason == "abort":
        raise ApiError(503, "the server shut down before the reply was complete.", kind="server_error")
    used = usage(event.prompt_tokens, event.completion_tokens)
    text = "".join(pieces)
    return JSONResponse(
        reply(shape.id, shape.created, shape.model, shape.chat, text, event.finish_reason, used)
    )


async def _cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """Wait for the client to hang up (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(job)
