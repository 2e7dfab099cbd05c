"""`tunesmith serve RUN`: a finished generative run behind an OpenAI-compatible endpoint.

GET /v1/models, POST /v1/chat/completions (the run's chat template) and POST /v1/completions (the prompt
continued as it is, no template), streamed or not. The model is
loaded once. Requests wait in a queue; one worker thread answers them in batches through the generate() that
eval and `tunesmith generate` use (left padding, KV cache), a batch holding requests with the same decoding
settings and length limit. A streamed request is answered on its own, token by token (transformers'
streamers follow one sequence). Decoding: the run's eval.decoding unless the request sets temperature or
top_p (temperature 0: greedy).
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.config.decoding import Decoding
from tunesmith.errors import UserError

WAIT_S = 0.02  # how long the worker waits for more requests to join a batch
TIMEOUT_S = 600.0


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send more (n, stop, ...): not refused, not used
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # over the server's --max-tokens: refused, with the limit
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False


class ChatRequest(Body):
    messages: list[Message] = Field(..., min_length=1)


class CompletionRequest(Body):
    prompt: str = Field(..., min_length=1)


@dataclass
class Ask:
    messages: list[dict] | str  # a plain string: continued as it is
    max_tokens: int
    decoding: Decoding
    streamer: object = None
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def key(self) -> tuple:
        return self.max_tokens, self.decoding.model_dump_json()


class Batcher:
    """The worker thread: takes a request, lets others with the same key join for WAIT_S (up to max_batch),
    and answers them with one generate() call."""

    def __init__(self, model, tokenizer, max_batch: int, seed: int = 0):
        self.model, self.tokenizer, self.max_batch, self.seed = model, tokenizer, max_batch, seed
        self.asks: queue.Queue[Ask] = queue.Queue()
        self.batches: list[int] = []  # each batch's size, for the log and the tests
        threading.Thread(target=self._work, daemon=True, name="tunesmith-serve").start()

    def submit(self, ask: Ask) -> Ask:
        self.asks.put(ask)
        return ask

    def _gather(self, first: Ask) -> list[Ask]:
        group, other = [first], []
        deadline = time.monotonic() + WAIT_S
        while first.streamer is None and len(group) < self.max_batch:
            try:
                ask = self.asks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (group if ask.streamer is None and ask.key() == first.key() else other).append(ask)
        for ask in other:  # another batch's: back in the queue
            self.asks.put(ask)
        return group

    def _work(self) -> None:
        from tunesmith.evaluation.generate import generate

        while True:
            group = self._gather(self.asks.get())
            self.batches.append(len(group))
            try:
                outputs, stopped = generate(
                    self.model,
                    self.tokenizer,
                    [a.messages for a in group],
                    group[0].max_tokens,
                    batch_size=len(group),
                    decoding=group[0].decoding,
                    seed=self.seed,
                    streamer=group[0].streamer,
                )
            except Exception as err:  # the requests fail, the server goes on
                for ask in group:
                    ask.done.set_exception(err)
                    if ask.streamer is not None:
                        ask.streamer.end()
                continue
            for ask, out, stop in zip(group, outputs, stopped):
                ask.done.set_result((out, stop))


def decoding_for(run_decoding: Decoding, req: Body) -> Decoding:
    """The run's eval.decoding, or the request's temperature/top_p; one candidate when streamed."""
    how = Decoding() if run_decoding.by_concepts else run_decoding  # a chat request carries no concepts
    if req.temperature == 0:
        how = Decoding()
    elif req.temperature is not None or req.top_p is not None:
        how = Decoding(do_sample=True, temperature=req.temperature or 1.0, top_p=req.top_p or 1.0)
    if req.stream:
        how = how.model_copy(update={"num_candidates": 1, "num_beams": 1, "rerank": "score"})
    return how


def openai_error(status: int, message: str, param: str | None = None):
    """An error as OpenAI's API sends it (its clients raise BadRequestError and the like from these)."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status in (400, 404) else "authentication_error" if status == 401 else "error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def refusals(app) -> None:
    """Bad requests answer 400 with OpenAI's error body (FastAPI's own would be 422 in its own shape)."""
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return openai_error(400, "the request body is not valid JSON")
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return openai_error(400, f"{where or 'body'}: {first.get('msg')}", where)

    @app.exception_handler(HTTPException)
    async def refused(request, exc: HTTPException):
        return openai_error(exc.status_code, str(exc.detail))


def token_budget(tokenizer, prompt: list[dict] | str, asked: int, context: int | None, limit: int) -> tuple[int, int]:
    """The prompt's length in tokens and the tokens the answer may take: a request over the server's limit
    or a prompt that fills the model's context is refused (400); an answer that would run past the context
    is cut at its end (finish_reason "length")."""
    from fastapi import HTTPException

    from tunesmith.data.tokenize import render_prompt

    if asked > limit:
        raise HTTPException(400, f"max_tokens {asked} is over this server's limit of {limit} (--max-tokens)")
    rendered = prompt if isinstance(prompt, str) else render_prompt(tokenizer, prompt)
    used = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if context is not None and used >= context:
        raise HTTPException(400, f"the prompt is {used} tokens; the model's context is {context} tokens")
    return used, asked if context is None else min(asked, context - used)


def create_app(
    model, tokenizer, cfg, name: str, api_key: str | None = None, max_batch: int = 8, max_tokens: int = 1024
):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import StreamingResponse
    from transformers import TextIteratorStreamer

    app = FastAPI(title="tunesmith serve", docs_url=None, redoc_url=None, openapi_url=None)
    refusals(app)
    app.state.batcher = batcher = Batcher(model, tokenizer, max_batch, cfg.seed)
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    context = getattr(model.config, "max_position_embeddings", None)

    @app.middleware("http")
    async def key_check(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return openai_error(401, "missing or wrong API key")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await answer(req, system + [m.model_dump() for m in req.messages], chat=True)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest):
        return await answer(req, req.prompt, chat=False)

    async def answer(req: Body, prompt: list[dict] | str, chat: bool):
        if req.model not in (None, name):
            raise HTTPException(404, f"this server has one model: {name}")
        asked = req.max_completion_tokens or req.max_tokens or min(cfg.eval.max_new_tokens, max_tokens)
        used, limit = token_budget(tokenizer, prompt, asked, context, max_tokens)
        how = decoding_for(cfg.eval.decoding, req)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time())}
        head["model"] = name
        if req.stream:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=TIMEOUT_S)
            ask = batcher.submit(Ask(prompt, limit, how, streamer))
            return StreamingResponse(chunks(head, streamer, ask, chat), media_type="text/event-stream")
        text, stopped = await asyncio_wrap(batcher.submit(Ask(prompt, limit, how)).done)
        done = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        choice = {"index": 0, "finish_reason": "stop" if stopped else "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": used, "completion_tokens": done, "total_tokens": used + done}
        return {**head, "object": kind, "choices": [choice], "usage": usage}

    return app


async def chunks(head: dict, streamer, ask: Ask, chat: bool):
    """A streamed answer as OpenAI's server-sent chunks: the pieces as the streamer yields them, then the
    finish reason and [DONE]."""
    from starlette.concurrency import iterate_in_threadpool

    def chunk(piece: str | None, finish: str | None) -> str:
        body = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if chat:  # the first chunk says who speaks, the last only why it ended
            delta = {"role": "assistant"} if piece is None and finish is None else {}
            body["choices"] = [{"index": 0, "delta": {**delta, **({"content": piece} if piece else {})}}]
        else:
            body["choices"] = [{"index": 0, "text": piece or ""}]
        body["choices"][0]["finish_reason"] = finish
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    if chat:
        yield chunk(None, None)
    async for piece in iterate_in_threadpool(streamer):
        if piece:
            yield chunk(piece, None)
    _, stopped = await asyncio_wrap(ask.done)
    yield chunk(None, "stop" if stopped else "length")
    yield "data: [DONE]\n\n"


async def asyncio_wrap(future: concurrent.futures.Future):
    import asyncio

    return await asyncio.wait_for(asyncio.wrap_future(future), TIMEOUT_S)


def serve(
    run_path, host: str, port: int, base: bool, api_key: str | None, max_batch: int, max_tokens: int = 1024
) -> None:
    """Check the run and the port, load the model once, print the URL, serve until Ctrl-C."""
    from tunesmith.security import LOOPBACK, claim_port

    try:
        import uvicorn
    except ImportError as err:
        raise UserError(f"serve needs {err.name}", hint="pip install 'tunesmith[ui]'") from None
    from tunesmith.inference import load_base, load_finetuned, open_run, require_task, weights_dir

    if not 0 < port < 65536 or max_batch < 1 or max_tokens < 1:
        raise UserError("--port must be a port number, and --max-batch and --max-tokens at least 1")
    run, cfg = open_run(run_path)
    require_task(run, cfg, classification=False)
    weights_dir(run)
    if host not in LOOPBACK and api_key is None:
        api_key = secrets.token_urlsafe(18)
        print(f"Off loopback every request needs the API key: Authorization: Bearer {api_key}", flush=True)
    shown = claim_port(host, port)
    model, tokenizer, cfg = (load_base if base else load_finetuned)(run)
    name = run.path.name + ("-base" if base else "")
    print(f"tunesmith serve: {name} at http://{shown}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    app = create_app(model, tokenizer, cfg, name, api_key, max_batch, max_tokens)
    uvicorn.run(app, host=host, port=port, log_level="warning")
