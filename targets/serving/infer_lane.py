"""The infer endpoint as plain ASGI, below the web framework (issue 27).

``POST /v2/models/{name}/infer`` (and ``…/versions/{version}/infer``) carries the load, and every
microsecond the gateway spends on it dilutes the saving the toolkit measures. FastAPI and Starlette
gave this route nothing it needs (routing by a fixed pattern, a ``Request`` object, exception
middleware, a ``Response`` object) and cost about 0.3 ms per request on the development machine
(docs/gateway-overhead.md). :class:`InferLane` sits in front of the app as its outermost
middleware: it answers infer requests itself, with the gateway's handler, and passes every other
request to the app untouched.

Contract of the handler: ``await handle(name, scope, receive) -> Reply``; it reads the body from
``receive`` and never raises for bad input (a 4xx :class:`Reply`). Should it raise anyway (a bug),
the lane answers a JSON 500 and logs the traceback, as the app's own handler of unexpected errors
does. After the answer went out, ``observe(status, latency_ms, content, header_length, labels)``
(the live dashboard) sees it, from the lane's start to the answer; its failures never reach the
client.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

from targets.backends.kserve import HEADER_LENGTH
from targets.serving.live import LABEL_HEADER

INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")
_LOG = logging.getLogger("uvicorn.error")
_LABEL = LABEL_HEADER.encode()


@dataclass(frozen=True)
class Reply:
    """An answer: status, body, media type and extra headers (name → value)."""

    status: int
    content: bytes
    media: str = "application/json"
    headers: dict = field(default_factory=dict)


def error_reply(status: int, message: str, headers: dict | None = None, **extra) -> Reply:
    """A JSON error ``{"error": message, **extra}``, encoded as the framework's JSONResponse does."""
    content = json.dumps({"error": message, **extra}, ensure_ascii=False, allow_nan=False, indent=None,
                         separators=(",", ":")).encode("utf-8")
    return Reply(status, content, "application/json", headers or {})


def request_header(scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case bytes) in an ASGI scope, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class InferLane:
    """Pure-ASGI middleware answering infer requests with ``handle``; see the module's contract."""

    def __init__(self, app, handle, observe=None):
        self.app, self.handle, self.observe = app, handle, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = INFER_PATH.match(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        started_ns = time.perf_counter_ns()
        try:
            reply = await self.handle(match.group(1), scope, receive)
        except Exception as exc:  # a bug, not bad input: still JSON, still logged
            _LOG.exception("infer request failed")
            reply = error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        headers = [(b"content-length", str(len(reply.content)).encode()),
                   (b"content-type", reply.media.encode())]
        headers += [(name.lower().encode("latin-1"), str(value).encode("latin-1"))
                    for name, value in reply.headers.items()]
        latency_ms = (time.perf_counter_ns() - started_ns) / 1e6
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.content})
        if self.observe is not None:
            try:
                self.observe(reply.status, latency_ms, reply.content, reply.headers.get(HEADER_LENGTH),
                             request_header(scope, _LABEL))
            except Exception:  # the dashboard must never break inference
                pass
