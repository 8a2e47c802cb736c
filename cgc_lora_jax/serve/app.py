"""The HTTP face of the engine: OpenAI-compatible routes on FastAPI.

    GET  /health                 {"status": "ok", "queued", "paused", "groups": {name: {slots, active}}}
    GET  /v1/models              one model id per task, plus "base" (the bare base, no adapters)
    POST /v1/completions         prompt -> text; "stream": true sends server-sent events
    POST /v1/chat/completions    messages -> assistant message; streamed likewise

Streaming sends `data: {chunk}\\n\\n` per text delta, a last chunk with finish_reason (then a usage
chunk with stream_options.include_usage) and `data: [DONE]`. Every error is OpenAI's JSON body
(protocol.error_body) with a 4xx status (5xx only for the server's own failures), so a bad
request never stops the server. A client that disconnects, streamed or not, has its request
cancelled at once: dropped from the queue or its slot freed.

    app = create_app(engine)          # the engine started (Engine.start) by the caller
    uvicorn.run(app, host="127.0.0.1", port=8000)
    with BackgroundServer(app) as server:      # or on an ephemeral port in a thread (tests, bench)
        httpx.get(f"{server.url}/health")
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from cgc_lora_jax.serve.engine import BASE_MODEL_ID, Engine
from cgc_lora_jax.serve.protocol import (ParsedRequest, chat_body, completion_body, error_body, error_type,
                                         parse_chat, parse_completion, usage)
from cgc_lora_jax.serve.generation import Failed, Finished, Generation, RequestError, TextDelta


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param, code), status_code=status)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="cgc-lora-jax", summary="1 + N CGC-LoRA serving, OpenAI-compatible")
    vocab_size = engine.server.base.model.config.vocab_size

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return _error(e.status, str(e), e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, f"{e.detail}", code=None)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        data = []
        for model_id, (group, _) in engine.routes.items():
            data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "cgc-lora-jax",
                         "root": engine.server.base.info["path"],
                         "parent": None if model_id == BASE_MODEL_ID else group})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await _read_json(request), vocab_size)
        return await _serve(request, parsed, engine.prompts.completion(parsed.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = parse_chat(await _read_json(request))
        return await _serve(request, parsed, engine.prompts.chat(parsed.prompt), chat=True)

    async def _serve(request: Request, parsed: ParsedRequest, prompt_ids: list[int], chat: bool):
        max_tokens = parsed.max_tokens or max(engine.config.context - len(prompt_ids), 1)
        params = dataclasses.replace(parsed.params, max_tokens=max_tokens)
        gen = engine.submit(parsed.model, prompt_ids, params, asyncio.get_running_loop())
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if parsed.stream:
            return StreamingResponse(_stream(gen, request_id, parsed, chat), media_type="text/event-stream")
        return await _collect(request, gen, request_id, parsed, chat)

    async def _collect(request: Request, gen: Generation, request_id: str, parsed: ParsedRequest, chat: bool):
        async def answer():
            texts = []
            while True:
                event = await gen.events.get()
                if isinstance(event, TextDelta):
                    texts.append(event.text)
                else:
                    return "".join(texts), event

        answer_task = asyncio.ensure_future(answer())
        gone_task = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({answer_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
            if not answer_task.done():
                answer_task.cancel()
                engine.cancel(gen)  # the client went away (or this handler was cancelled)
        if not answer_task.done() or answer_task.cancelled():
            return _error(499, "the client closed the request")  # nobody reads this
        text, event = answer_task.result()
        if isinstance(event, Failed):
            return _error(500, event.message)
        build = chat_body if chat else completion_body
        return build(request_id, gen.created, parsed.model, text, event)

    async def _stream(gen: Generation, request_id: str, parsed: ParsedRequest, chat: bool):
        build = chat_body if chat else completion_body
        try:
            if chat:
                yield _sse(chat_body(request_id, gen.created, parsed.model, None, None, chunk=True, role=True))
            while True:
                event = await gen.events.get()
                if isinstance(event, TextDelta):
                    yield _sse(build(request_id, gen.created, parsed.model, event.text, None, chunk=True))
                elif isinstance(event, Finished):
                    yield _sse(build(request_id, gen.created, parsed.model, "", event, chunk=True))
                    if parsed.include_usage:
                        yield _sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": gen.created, "model": parsed.model, "choices": [],
                                    "usage": usage(event)})
                    yield "data: [DONE]\n\n"
                    return
                else:  # Failed: the stream has begun, so the error goes in-band
                    yield _sse(error_body(event.message, "server_error"))
                    return
        finally:
            engine.cancel(gen)  # a no-op when the answer ended; frees the slot when the client left

    return app


class BackgroundServer:
    """uvicorn serving `app` from a thread, on `host` and a free port unless one is given."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn stopped during start-up; see its log")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
