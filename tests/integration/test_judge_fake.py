"""A scriptable stand-in for the paid judge API: a real HTTP server on 127.0.0.1 (uvicorn, own thread).

It serves the OpenAI layout (POST /v1/chat/completions) and, once `azure(...)` names a deployment, the Azure
OpenAI one (POST /openai/deployments/<deployment>/chat/completions?api-version=<v>, key in an `api-key` header),
refusing a wrong key (401), deployment or api-version (404) as Azure does. Other judge and reward-server tests
import `FakeJudge` from here; the tests below check the instrument itself (its in-flight counter is what the
concurrency test relies on, its refusals what the Azure tests rely on).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class Reply:
    """What the fake answers to one request."""

    status: int = 200
    body: str = ""
    delay_s: float = 0.0
    headers: dict[str, str] | None = None

    @classmethod
    def chat(cls, content: str, delay_s: float = 0.0) -> Reply:
        payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        return cls(200, json.dumps(payload), delay_s)


Script = Callable[[int, dict, str], Reply]  # (request index, JSON body, user message) -> Reply


@dataclass
class AzureDeployment:
    """What the fake's Azure route accepts."""

    deployment: str
    api_version: str
    key: str


def _azure_error(status: int, code: str, message: str) -> Response:
    return Response(json.dumps({"error": {"code": code, "message": message}}), status, media_type="application/json")


def user_message(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def score_by_prediction(correct: set[str]) -> Script:
    """A judge that says 1 exactly when the prompt's prediction line holds one of `correct`."""

    def script(index: int, body: dict, user: str) -> Reply:
        prediction = user.split("Model prediction: ", 1)[1].split("\n", 1)[0]
        return Reply.chat(f"Score: {1 if prediction in correct else 0}")

    return script


class FakeJudge:
    """POST /v1/chat/completions answered by `self.script`; records requests and peak concurrency."""

    def __init__(self) -> None:
        self.script: Script = lambda index, body, user: Reply.chat("Score: 1")
        self.bodies: list[dict] = []
        self.auth_headers: list[str | None] = []
        # Every request that reached a route, refused or not: path, query parameters, api-key, authorization.
        self.seen: list[dict] = []
        self.azure_deployment: AzureDeployment | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def num_requests(self) -> int:
        return len(self.bodies)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def endpoint(self) -> str:
        """The Azure resource endpoint, written as Azure shows it (trailing slash)."""
        return f"http://127.0.0.1:{self.port}/"

    def azure(self, deployment: str, api_version: str, key: str) -> None:
        """Serve one Azure deployment (until the next call)."""
        self.azure_deployment = AzureDeployment(deployment, api_version, key)

    def reset(self, script: Script) -> None:
        """New script and fresh counters, once handlers left over from earlier tests (replies the
        client gave up on) have finished: they would otherwise count as in flight."""
        deadline = time.monotonic() + 10
        while self.in_flight:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake judge: {self.in_flight} requests still in flight")
            time.sleep(0.01)
        self.script = script
        self.bodies.clear()
        self.auth_headers.clear()
        self.seen.clear()
        self.max_in_flight = 0

    def _record(self, request: Request) -> None:
        self.seen.append({
            "path": request.url.path,
            "query": sorted(request.query_params.multi_items()),
            "api_key": request.headers.get("api-key"),
            "authorization": request.headers.get("authorization"),
        })

    async def _azure_chat(self, request: Request) -> Response:
        """Azure's checks, in its order: the key, then the api-version, then the deployment."""
        self._record(request)
        want = self.azure_deployment
        if want is None:
            return _azure_error(404, "404", "Resource not found")
        if request.headers.get("api-key") != want.key:
            return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        if request.query_params.get("api-version") != want.api_version:
            return _azure_error(404, "404", "Resource not found")
        if request.path_params["deployment"] != want.deployment:
            return _azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
        return await self._answer(request)

    async def _openai_chat(self, request: Request) -> Response:
        self._record(request)
        return await self._answer(request)

    async def _answer(self, request: Request) -> Response:
        self.in_flight += 1  # one event loop thread: plain counters are exact
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            index = len(self.bodies)
            self.bodies.append(body)
            self.auth_headers.append(request.headers.get("authorization"))
            reply = self.script(index, body, user_message(body))
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            return Response(reply.body, status_code=reply.status, media_type="application/json", headers=reply.headers)
        finally:
            self.in_flight -= 1

    def start(self) -> None:
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._openai_chat, methods=["POST"]),
            Route("/openai/deployments/{deployment}/chat/completions", self._azure_chat, methods=["POST"]),
        ])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", backlog=4096)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake judge did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake_judge():
    judge = FakeJudge()
    judge.start()
    yield judge
    judge.stop()


def _post(client: httpx.AsyncClient, judge: FakeJudge) -> asyncio.Future:
    body = {"model": "m", "messages": [{"role": "user", "content": "Model prediction: x\n"}]}
    return client.post(judge.base_url + "/chat/completions", json=body)


def test_fake_counts_peak_concurrency(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda index, body, user: Reply.chat("Score: 1", delay_s=0.3))

    async def fire(n: int) -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as client:
            return [r.status_code for r in await asyncio.gather(*(_post(client, fake_judge) for _ in range(n)))]

    assert asyncio.run(fire(7)) == [200] * 7
    assert fake_judge.num_requests == 7
    assert fake_judge.max_in_flight == 7
    assert fake_judge.in_flight == 0


def test_fake_follows_its_script(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda index, body, user: Reply(500, "boom") if index == 0 else Reply.chat("Score: 0"))

    async def twice() -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return [await _post(client, fake_judge), await _post(client, fake_judge)]

    first, second = asyncio.run(twice())
    assert (first.status_code, first.text) == (500, "boom")
    assert second.json()["choices"][0]["message"]["content"] == "Score: 0"


def test_fake_azure_route_refuses_what_azure_refuses(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda index, body, user: Reply.chat("Score: 1"))
    fake_judge.azure("judge-dep", "2024-10-21", "k1")
    body = {"messages": [{"role": "user", "content": "Model prediction: x\n"}]}

    async def post(deployment: str, params: dict, headers: dict) -> int:
        url = f"{fake_judge.endpoint}openai/deployments/{deployment}/chat/completions"
        async with httpx.AsyncClient() as client:
            return (await client.post(url, params=params, headers=headers, json=body)).status_code

    good = {"api-version": "2024-10-21"}
    assert asyncio.run(post("judge-dep", good, {"api-key": "k1"})) == 200
    assert asyncio.run(post("judge-dep", good, {"api-key": "k2"})) == 401
    assert asyncio.run(post("judge-dep", good, {"Authorization": "Bearer k1"})) == 401
    assert asyncio.run(post("judge-dep", {"api-version": "2023-05-15"}, {"api-key": "k1"})) == 404
    assert asyncio.run(post("judge-dep", {}, {"api-key": "k1"})) == 404
    assert asyncio.run(post("other-dep", good, {"api-key": "k1"})) == 404
    assert fake_judge.num_requests == 1 and len(fake_judge.seen) == 6
