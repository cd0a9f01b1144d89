"""The HTTP API (FastAPI): one base model, many adapters, concurrent requests batched by ``BatchEngine``.

Endpoints:
    GET  /health          {"status": "ok", "adapters": [...], "active_rows": n, "queued": n}
    GET  /v1/adapters     {"adapters": [{"name", "methods", "mixable"}]}
    POST /v1/generate     {"prompt", "adapter", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                           "seed", "num_beams", "stream"}

With ``"stream": true`` (the default) the answer is server-sent events, one ``data: <json>`` line per event:
``{"token": id, "text": "<new text>"}`` per token (a trailing incomplete UTF-8 character is held back; a last
``{"text": ...}`` event without a token flushes it), then ``{"done": true, "finish_reason": "eos" | "length",
"text": "<all>", "tokens": [...], "adapter": ...}``, or ``{"error": "..."}``. Without streaming the final object is
the JSON body. A beam-search request (``num_beams`` > 1) runs alone and streams all its tokens at the end. Errors
are JSON ``{"error": "..."}`` with status 400 (prompt too long, setting over a server limit), 404 (unknown adapter),
413 (body over ``max_body_bytes``), 422 (malformed body or setting, a value of the wrong JSON type, beams with
sampling), 500 (this request failed in generation; the other requests go on), 503 (queue full).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..core.peft_model import PeftModel
from .batching import (
    MAX_BEAMS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    BatchEngine,
    GenerationRequest,
    GenerationSettings,
    QueueFullError,
)


class GenerateBody(BaseModel):
    """The body of POST /v1/generate. Strict: a value of another JSON type (``"8"`` for 8, ``"yes"`` for true) is
    refused, not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="The prompt text.")
    adapter: str | None = Field(None, description="Adapter name; null for the bare base model.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest continuation (EOS included); null: 32, or the server's limit if lower."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Keep the k most likely tokens when sampling.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the sampling generator (64 bits).")
    num_beams: int = Field(
        1, ge=1, le=MAX_BEAMS, description="Beam search with this many beams (greedy); > 1: tokens sent at the end."
    )
    stream: bool = Field(True, description="Stream server-sent events; false: one JSON answer at the end.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app reads it, from its Content-Length
    when there is one, else as soon as the streamed (chunked) body crosses the limit; at most ``limit`` bytes are
    held. The accepted body is handed to the app whole, then ``receive`` goes on to the server's (disconnects)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, f"Content-Length {int(length)}")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, f"more than {self.limit} bytes streamed")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        first: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict[str, Any]:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, got: str) -> None:
        body = json.dumps({"error": f"the request body is too large ({got}); this server's limit is {self.limit} "
                                    "bytes (max_body_bytes)"}).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TextStream:
    """Token ids -> text deltas. A trailing U+FFFD may be an incomplete UTF-8 character (a byte tokenizer emits one
    byte per token) that later tokens complete, so it is held back; every earlier character is final."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.text
        return self._send(text.removesuffix("\ufffd"))

    def flush(self) -> str:
        return self._send(self.text)

    def _send(self, stable: str) -> str:
        delta, self.sent = stable[len(self.sent) :], stable
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens)


def create_app(
    engine: BatchEngine,
    tokenizer,
    *,
    max_prompt_tokens: int = 1024,
    max_new_tokens: int = 256,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The FastAPI app around a (not yet started) engine; the app starts and stops it with its lifespan. Request
    bodies over ``max_body_bytes`` get 413 before they are read whole."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="ssmtune serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    model = engine.model

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}{got}")
        return _error(422, "; ".join(parts))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "adapters": engine.adapters,
            "active_rows": engine.active_rows,
            "queued": engine.pending,
        }

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        out = []
        if isinstance(model, PeftModel):
            for name in model.adapter_names:
                methods = [c.method for c in model.peft_config[name]]
                out.append({"name": name, "methods": methods, "mixable": model.routable(name)})
        return {"adapters": out}

    @app.post("/v1/generate", response_model=None)
    async def generate(body: GenerateBody, request: Request) -> JSONResponse | StreamingResponse:
        if body.adapter is not None and body.adapter not in engine.adapters:
            return _error(404, f"unknown adapter {body.adapter!r}; adapters: {engine.adapters}")
        if body.max_new_tokens is None:
            body.max_new_tokens = min(32, max_new_tokens)
        if body.max_new_tokens > max_new_tokens:
            return _error(400, f"max_new_tokens={body.max_new_tokens} is over this server's limit of {max_new_tokens}")
        # off the event loop: a long prompt must not stall the other requests (and /health) while it is tokenized
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
        if len(ids) > max_prompt_tokens:
            return _error(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt_tokens}")
        try:
            settings = GenerationSettings(
                max_new_tokens=body.max_new_tokens, do_sample=body.do_sample, temperature=body.temperature,
                top_k=body.top_k, top_p=body.top_p, seed=body.seed, num_beams=body.num_beams,
            )  # fmt: skip
        except ValueError as e:  # settings that are valid alone but not together (beams with sampling)
            return _error(422, str(e))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def emit(event: dict[str, Any]) -> None:
            # called from the engine thread; the loop may be gone if the server is stopping
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        req = GenerationRequest(prompt_ids=ids, adapter=body.adapter, settings=settings, emit=emit)
        try:
            engine.submit(req)
        except QueueFullError as e:
            return _error(503, str(e))
        text = _TextStream(tokenizer)

        def final(event: dict[str, Any]) -> dict[str, Any]:
            return {
                "done": True, "finish_reason": event["finish_reason"], "text": text.text, "tokens": text.tokens,
                "adapter": body.adapter,
            }  # fmt: skip

        if not body.stream:
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        # the client went away: nobody will read the answer, so its row is freed now
                        getter.cancel()
                        return _error(499, "the client went away")
                    event = getter.result()
                    if "token" in event:
                        text.add(event["token"])
                    elif "error" in event:
                        return _error(500, event["error"])
                    else:
                        return JSONResponse(final(event))
            finally:
                gone.cancel()
                req.cancelled.set()

        async def sse() -> AsyncIterator[str]:
            try:
                while True:
                    event = await events.get()
                    if "token" in event:
                        out = {"token": event["token"], "text": text.add(event["token"])}
                    elif "error" in event:
                        yield f"data: {json.dumps(event)}\n\n"
                        return
                    else:
                        rest = text.flush()
                        if rest:
                            yield f"data: {json.dumps({'text': rest})}\n\n"
                        yield f"data: {json.dumps(final(event))}\n\n"
                        return
                    yield f"data: {json.dumps(out)}\n\n"
            finally:
                # a client that went away frees its row at the next step
                req.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client of a request whose body was read has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
