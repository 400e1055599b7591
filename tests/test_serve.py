"""`align serve` (align.serve) on the tiny run, through OpenAI's own Python client: models, replies (non-streaming
and streaming, which streams as it generates), concurrent requests for two stages get their sequential replies, and
OpenAI-style errors for what it does not do."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from align.models import generation
from align.serve import Served, create_app

PROMPT = [{"role": "user", "content": "What is 2 + 3? Answer with the number."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    served = Served(str(tiny_run), max_tokens=64)
    port = _free_port()
    running = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join()
    served.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _reply(client, model: str, **kwargs) -> str:
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=16, temperature=0,
                                          **kwargs).choices[0].message.content


def test_models_and_a_reply(client):
    assert [m.id for m in client.models.list()] == ["sft", "dpo"]
    out = client.chat.completions.create(model="dpo", messages=PROMPT, max_completion_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_concurrent_requests_for_two_stages_get_their_sequential_replies(client):
    sequential = {m: _reply(client, m) for m in ("sft", "dpo")}
    with ThreadPoolExecutor(4) as pool:
        futures = [(m, pool.submit(_reply, client, m)) for m in ("sft", "dpo", "sft", "dpo")]
        assert all(f.result() == sequential[m] for m, f in futures)


def test_a_streamed_reply_is_the_same_reply_and_starts_before_half_its_tokens(client, monkeypatch):
    generated: list[float] = []
    put = generation.TextStream.put

    def slow_put(self, value):  # 20 ms a token, so that the stream's timing can be read
        if self.prompt_seen:
            time.sleep(0.02)
            generated.append(time.monotonic())
        put(self, value)

    monkeypatch.setattr(generation.TextStream, "put", slow_put)
    whole = client.chat.completions.create(model="sft", messages=PROMPT, max_tokens=32,
                                           temperature=0).choices[0].message.content
    generated.clear()
    pieces, first = [], None
    for chunk in client.chat.completions.create(model="sft", messages=PROMPT, max_tokens=32, temperature=0,
                                                stream=True):
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        if delta.content:
            first = first or time.monotonic()
            pieces.append(delta.content)
        last = chunk.choices[0].finish_reason
    assert "".join(pieces) == whole and last in ("stop", "length") and len(pieces) >= 2
    assert first < generated[len(generated) // 2]


@pytest.mark.parametrize("kwargs, error, words", [
    ({"model": "ppo"}, openai.NotFoundError, ["ppo", "does not exist"]),
    ({"n": 2}, openai.BadRequestError, ["n must be 1"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, openai.BadRequestError,
     ["tools"]),
    ({"max_tokens": 10_000}, openai.BadRequestError, ["max_tokens must be an integer from 1 to 64"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError, ["role must be one of"]),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError, ["last message"]),
])
def test_what_it_does_not_do_is_an_openai_style_error(client, kwargs, error, words):
    request = {"model": "sft", "messages": PROMPT, "max_tokens": 8, **kwargs}
    with pytest.raises(error) as err:
        client.chat.completions.create(**request)
    assert all(w in err.value.message for w in words), err.value.message


def test_malformed_json_and_a_foreign_host_are_refused(server):
    bad = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    foreign = httpx.get(f"{server}/v1/models", headers={"host": "evil.example:80"})
    assert foreign.status_code == 400
