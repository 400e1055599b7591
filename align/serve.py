"""`align serve RUN[/STAGE]`: an OpenAI-compatible server for a run's stages, on loopback unless told otherwise.

`GET /v1/models` lists the served stages; `POST /v1/chat/completions` answers with the stage named by `model`
(`sft`, `dpo`, ... or `base`), non-streaming or streaming (`chat.completion.chunk` events, then `data: [DONE]`).
All stages are adapters on the one loaded base; a request switches to its stage's adapter and generates under one
lock, so requests are served one at a time and concurrent requests get exactly their sequential replies. The prompt
goes through the run's chat template, as in training and `align eval`.

Errors are OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): an unknown model is 404; what align
does not do (`n` > 1, tools, logprobs, a response format other than text) and malformed requests are 400, never a
traceback. Like `align collect serve`, it answers only requests addressed to its own address (align.web).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from align.errors import AlignError
from align.models.generation import Decoding, TextStream
from align.models.tokens import encode_prompt
from align.run_folder import RECIPE_FILE
from align.runs import BASE, acting_as, open_run, open_stage
from align.stages.kind import kind_of
from align.web import AllowedHosts

ROLES = ("system", "user", "assistant")
UNSUPPORTED = {"tools": "tools", "tool_choice": "tools", "functions": "function calling",
               "function_call": "function calling", "audio": "audio output"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, self.status)


class Served:
    """A run's stages on its one base, lent to one request at a time."""

    def __init__(self, run_path: str, stages: list[str] | None = None, max_tokens: int = 512):
        if (Path(run_path) / RECIPE_FILE).is_file():
            run = open_run(run_path)
        else:  # RUN/STAGE: that stage alone
            run, stage = open_stage(run_path)
            stages = stages or [stage]
        self.run, self.max_tokens = run, max_tokens
        self.names = stages or [s for s in run.finished() if kind_of(run.stage(s)).policy]
        if not self.names:
            raise AlignError(f"{run_path}: no finished policy stage to serve; name stages with --stages (or base)")
        folders = {name: run.adapter(name) for name in self.names if name != BASE}  # unknown stages fail here
        from align.models.host import ModelHost

        self.host = ModelHost(run.recipe.model)
        self.held = ExitStack()  # the base is lent for the server's life; close() gives it back
        self.model = self.held.enter_context(self.host.adapters(folders)).eval()
        self.tokenizer = self.host.tokenizer
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()
        self.created = int(time.time())

    def close(self) -> None:
        self.held.close()

    def check(self, body) -> dict:
        """The request's settings, or a RequestError saying what is wrong with it."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        for key, what in UNSUPPORTED.items():
            if body.get(key):
                raise RequestError(400, f"{what} are not supported by align serve", key, "unsupported_parameter")
        if body.get("n", 1) != 1:
            raise RequestError(400, "align serve returns one choice per request: n must be 1", "n",
                               "unsupported_parameter")
        if body.get("logprobs"):
            raise RequestError(400, "logprobs are not supported by align serve", "logprobs", "unsupported_parameter")
        if (body.get("response_format") or {}).get("type", "text") != "text":
            raise RequestError(400, "only text responses are supported", "response_format", "unsupported_parameter")
        model = body.get("model")
        if model not in self.names:
            raise RequestError(404, f"The model '{model}' does not exist; served: {', '.join(self.names)}", "model",
                               "model_not_found")
        messages = _messages(body.get("messages"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        limit = self.max_tokens if limit is None else limit
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= self.max_tokens:
            raise RequestError(400, f"{param} must be an integer from 1 to {self.max_tokens} (this server's "
                               f"--max-tokens), got {limit!r}", param, "invalid_value")
        temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise RequestError(400, f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise RequestError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(400, f"seed must be an integer, got {seed!r}", "seed")
        ids = encode_prompt(self.tokenizer, messages)
        if self.context and len(ids) + limit > self.context:
            raise RequestError(400, f"the prompt is {len(ids)} tokens and the model's context of {self.context} must "
                               f"also hold {limit} new tokens", "messages", "context_length_exceeded")
        return {"model": model, "ids": ids, "decoding": Decoding(limit, temperature > 0, temperature or 1.0, top_p),
                "seed": seed, "stream": bool(body.get("stream"))}

    @torch.no_grad()
    def complete(self, request: dict, on_text=lambda piece: None) -> dict:
        """The reply to a checked request: text, finish reason and token counts; `on_text` sees it as it comes."""
        with self.lock, acting_as(self.model, request["model"]):
            if request["seed"] is not None:
                torch.manual_seed(request["seed"])
            stream = TextStream(self.tokenizer, on_text)
            input_ids = torch.tensor([request["ids"]], device=self.model.device)
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                streamer=stream, **request["decoding"].kwargs())
        ended = bool(stream.ids) and stream.ids[-1] == self.tokenizer.eos_token_id
        return {"text": stream.text, "finish_reason": "stop" if ended else "length",
                "usage": {"prompt_tokens": len(request["ids"]), "completion_tokens": len(stream.ids),
                          "total_tokens": len(request["ids"]) + len(stream.ids)}}


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"messages[{i}]: only text content parts are supported",
                                   f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}]: content must be a string", f"messages[{i}].content")
        out.append({"role": message["role"], "content": content})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's", "messages")
    return out


def _chunk(ident: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(data)}\n\n"


def create_app(served: Served, host: str = "127.0.0.1"):
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": served.created,
                                                         "owned_by": "align"} for name in served.names]})

    async def completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return RequestError(400, "the body is not valid JSON").response()
        try:
            checked = served.check(body)
        except RequestError as err:
            return err.response()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if checked["stream"]:
            return StreamingResponse(_events(served, checked, ident, created), media_type="text/event-stream")
        reply = await run_in_threadpool(served.complete, checked)
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": checked["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply["text"]},
                                          "finish_reason": reply["finish_reason"]}], "usage": reply["usage"]})

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions, methods=["POST"])])
    return AllowedHosts(app, host, "use the address `align serve` printed")


async def _events(served: Served, checked: dict, ident: str, created: int):
    """The reply as server-sent events: the role at once, then each piece of text as it is generated."""
    pieces: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            pieces.put(served.complete(checked, pieces.put))
        finally:
            pieces.put(done)

    threading.Thread(target=work, daemon=True).start()
    model = checked["model"]
    yield _chunk(ident, created, model, {"role": "assistant", "content": ""})
    reply = None
    while (item := await run_in_threadpool(pieces.get)) is not done:
        if isinstance(item, dict):
            reply = item
        else:
            yield _chunk(ident, created, model, {"content": item})
    yield _chunk(ident, created, model, {}, reply["finish_reason"] if reply else "stop")
    yield "data: [DONE]\n\n"


def serve(run_path: str, stages: list[str] | None, host: str, port: int, max_tokens: int) -> None:
    import uvicorn

    from align.ui import console

    served = Served(run_path, stages, max_tokens)
    console.print(f"serving {', '.join(served.names)} of {served.run.dir} at http://{host}:{port}/v1 "
                  "(OpenAI API: GET /v1/models, POST /v1/chat/completions); Ctrl-C stops")
    try:
        uvicorn.run(create_app(served, host), host=host, port=port, log_level="warning")
    finally:
        served.close()
