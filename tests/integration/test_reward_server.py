"""The reward server as a real process over HTTP: auth, payload errors, judge failures, the spreading client."""
from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from megatron_minio3.config.reward import RemoteRewardConfig, RewardConfig
from megatron_minio3.rewards.client import RemoteRewardClient
from megatron_minio3.rewards.manager import RewardManager
from megatron_minio3.rewards.server import is_loopback
from megatron_minio3.rewards.types import RewardInput
from tests.integration.test_judge_fake import FakeJudge, Reply, fake_judge  # noqa: F401  (fixture)

TOKEN = "reward-token-for-tests"
TOKEN_ENV = "MINIO3_TEST_REWARD_TOKEN"
JUDGE_KEY_ENV = "MINIO3_TEST_SERVER_JUDGE_KEY"
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_REQUEST_BYTES = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_minio3.rewards.server", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def server(fake_judge: FakeJudge, tmp_path_factory: pytest.TempPathFactory):
    """A reward server process: vstar -> mc, visualprobe -> the fake judge, geo -> math, everything else -> exact;
    bodies up to 1 MB, rule-based verifiers stopped after 1 s, a request's scoring after 6 s."""
    config = {
        "reward": {
            "verifiers": {"vstar": "mc", "visualprobe": "judge", "geo": "math"},
            "default_verifier": "exact",
            "verifier_timeout_s": 1.0,
            "remote": {"max_request_bytes": MAX_REQUEST_BYTES, "max_request_s": 6.0},
            "judge": {
                "base_url": fake_judge.base_url,
                "api_key_env": JUDGE_KEY_ENV,
                "backoff_initial_s": 0.01,
                "timeout_s": 2,
            },
        }
    }
    path = tmp_path_factory.mktemp("reward_server") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN, JUDGE_KEY_ENV: "sk-server-side"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_minio3.rewards.server", "--config", str(path), "reward.judge.max_retries=1",
         "--port", str(port), "--token-env", TOKEN_ENV, "--log-level", "warning"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"reward server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("reward server did not become healthy")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def payload(**overrides) -> dict:
    body = {
        "inputs": [
            {"uid": "a", "data_source": "vstar", "question": "Which?", "ground_truth": "B",
             "turns": ["<think>t</think><answer>(B) red</answer>"], "num_tool_calls": 0, "num_tool_errors": 0},
        ],
        "validation": True,
        "step": 0,
        "total_steps": 1,
    }
    body.update(overrides)
    return body


def post(url: str, body) -> httpx.Response:
    return httpx.post(url + "/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_health_needs_no_token(server: str) -> None:
    response = httpx.get(server + "/health", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"])
def test_score_requires_the_bearer_token(server: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(server + "/score", json=payload(), headers=headers, timeout=30)
    assert response.status_code == 401
    assert "bearer token" in response.json()["detail"]


def test_scores_over_http(server: str, fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply.chat("Score: 1" if "Model prediction: red" in user else "Score: 0"))
    inputs = payload()["inputs"] + [
        {"uid": "b", "data_source": "visualprobe", "question": "Colour?", "ground_truth": "red",
         "turns": ["<think>t</think><answer>red</answer>"]},
        {"uid": "c", "data_source": "visualprobe", "question": "Colour?", "ground_truth": "red",
         "turns": ["<think>t</think><answer>blue</answer>"]},
        {"uid": "d", "data_source": "counting", "question": "How many?", "ground_truth": "3",
         "turns": ["<think>t</think><answer>three</answer>"], "verifier": None},
    ]
    response = post(server, payload(inputs=inputs))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["score"] for r in results] == [1.0, 1.0, 0.0, 1.0]
    assert [r["failed"] for r in results] == [False] * 4
    assert fake_judge.num_requests == 2
    assert fake_judge.auth_headers[0] == "Bearer sk-server-side"


def test_judge_failure_comes_back_failed_never_a_silent_zero(server: str, fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply(500, "judge down"))
    judged = {"uid": "j", "data_source": "visualprobe", "question": "Colour of the umbrella?",
              "ground_truth": "green", "turns": ["<think>t</think><answer>green</answer>"]}
    validation = post(server, payload(inputs=[judged])).json()["results"][0]
    assert validation["failed"] is True and validation["score"] == 0.0
    assert "HTTP 500" in validation["error"] and "2 attempts" in validation["error"]
    training = post(server, payload(inputs=[judged], validation=False)).json()["results"][0]
    assert training["failed"] is True and training["score"] is None  # NaN travels as null


BAD_PAYLOADS = {
    "missing inputs": ({"validation": True}, "inputs"),
    "missing validation": ({"inputs": []}, "validation"),
    "turns not a list": (payload(inputs=[{**payload()["inputs"][0], "turns": "<answer>B</answer>"}]), "turns"),
    "uid not a string": (payload(inputs=[{**payload()["inputs"][0], "uid": 7}]), "uid"),
    "unknown field": (payload(inputs=[{**payload()["inputs"][0], "reward": 1.0}]), "reward"),
    "negative tool calls": (payload(inputs=[{**payload()["inputs"][0], "num_tool_calls": -1}]), "num_tool_calls"),
    "validation as string": (payload(validation="yes"), "validation"),
    "negative step": (payload(step=-1), "step"),
    "zero total steps": (payload(total_steps=0), "total_steps"),
    "not an object": ([1, 2, 3], "dict"),
}


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_bad_payloads_get_422_with_a_message(server: str, name: str) -> None:
    body, field = BAD_PAYLOADS[name]
    response = post(server, body)
    assert response.status_code == 422, response.text
    assert "results" not in response.json()
    assert field in response.text


def test_invalid_json_and_unknown_verifier(server: str) -> None:
    response = httpx.post(
        server + "/score", content=b"{not json", timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422 and "json" in response.text.lower()
    response = post(server, payload(inputs=[{**payload()["inputs"][0], "verifier": "astrology"}]))
    assert response.status_code == 400
    assert "'astrology'" in response.json()["detail"] and "results" not in response.json()


def test_client_spreads_over_servers_and_fails_the_unreachable_one(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = RewardConfig(remote=RemoteRewardConfig(urls=[server, dead], token_env=TOKEN_ENV, timeout_s=30))
    manager = RewardManager(cfg)
    assert asyncio.run(RemoteRewardClient(cfg.remote).health()) == {server: True, dead: False}
    inputs = [
        RewardInput(str(i), "vstar", "Which?", "B", [f"<think>t</think><answer>{'B' if i % 2 else 'A'}</answer>"])
        for i in range(6)
    ]
    first = manager.score_sync(inputs, validation=False)  # chunk 0..2 -> live server, 3..5 -> dead
    assert [r.failed for r in first] == [False] * 3 + [True] * 3
    assert [r.score for r in first[:3]] == [0.0, 1.0, 0.0]
    assert all(math.isnan(r.score) and "unreachable" in r.error and dead in r.error for r in first[3:])
    second = manager.score_sync(inputs, validation=True)  # the rotation sends chunk 0 to the dead one
    assert [r.failed for r in second] == [True] * 3 + [False] * 3
    assert [r.score for r in second] == [0.0, 0.0, 0.0, 1.0, 0.0, 1.0]

    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    (unauthorised,) = RewardManager(cfg).score_sync(inputs[:1], validation=True)
    assert unauthorised.failed and "HTTP 401" in unauthorised.error


def test_refuses_a_public_address_without_a_token() -> None:
    env = {TOKEN_ENV: ""}
    result = run_server_cli(["--host", "0.0.0.0", "--token-env", TOKEN_ENV], env)
    assert result.returncode == 2
    assert "refusing" in result.stderr and TOKEN_ENV in result.stderr


def test_bad_config_is_refused_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"reward": {"judge": {"max_concurency": 8}}}))
    result = run_server_cli(["--config", str(path)], {})
    assert result.returncode == 2
    assert "reward.judge.max_concurency" in result.stderr
    result = run_server_cli(["reward.verifiers={vstar: multiple_choice}", "reward.default_verifier=mc"], {})
    assert result.returncode == 2
    assert "reward.verifiers['vstar'] = 'multiple_choice'" in result.stderr


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.8.0.1", "::1", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "::", "10.0.0.5", "example.com", "my-host"])


# ---------------------------------------------------------------- size and time limits (issue 15)


def _sample(uid: str, answer: str, source: str = "vstar", truth: str = "B") -> dict:
    return {"uid": uid, "data_source": source, "question": "Which?", "ground_truth": truth,
            "turns": [f"<think>t</think><answer>{answer}</answer>"]}


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(server: str) -> None:
    big = payload(inputs=[_sample("big", "B" * (2 * MAX_REQUEST_BYTES))])
    response = post(server, big)  # declared with Content-Length
    assert response.status_code == 413, response.text
    assert f"reward.remote.max_request_bytes={MAX_REQUEST_BYTES}" in response.json()["detail"]

    def chunks():  # streamed without Content-Length
        for _ in range(40):
            yield b" " * 65536

    response = httpx.post(server + "/score", content=chunks(), timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "max_request_bytes" in response.json()["detail"]
    assert post(server, payload()).status_code == 200  # the server goes on


def test_a_verifier_past_its_time_limit_fails_the_sample_not_the_server(server: str) -> None:
    post(server, payload(inputs=[_sample("warm", "0.5", "geo", "1/2")]))  # the math workers are started
    started = time.monotonic()
    response = post(server, payload(inputs=[_sample("slow", "2^{2^{2^{2^{100}}}}", "geo", "2"),
                                            _sample("ok", "0.5", "geo", "\\frac{1}{2}"), _sample("mc", "B")]))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    slow, ok, mc = response.json()["results"]
    assert slow["failed"] is True and "no verdict within reward.verifier_timeout_s=1 s" in slow["error"]
    assert (ok["failed"], ok["score"], mc["failed"], mc["score"]) == (False, 1.0, False, 1.0)
    assert elapsed < 5.0, elapsed
    assert httpx.get(server + "/health", timeout=5).status_code == 200


def test_the_client_splits_requests_to_fit_the_limit(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    remote = RemoteRewardConfig(urls=[server], token_env=TOKEN_ENV, timeout_s=30, max_request_bytes=MAX_REQUEST_BYTES)
    manager = RewardManager(RewardConfig(remote=remote))
    padding = "x" * (MAX_REQUEST_BYTES // 4)  # four of these make a body over the limit
    inputs = [RewardInput(str(i), "vstar", "Which?", "B", [f"{padding}<answer>{'B' if i % 2 else 'A'}</answer>"])
              for i in range(6)]
    inputs.append(RewardInput("huge", "vstar", "Which?", "B", ["y" * MAX_REQUEST_BYTES + "<answer>B</answer>"]))
    results = manager.score_sync(inputs, validation=True)
    assert [r.score for r in results[:6]] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert not any(r.failed for r in results[:6])
    assert results[6].failed and "'huge' is" in results[6].error and "max_request_bytes" in results[6].error


def test_a_request_past_its_time_limit_gets_504(server: str) -> None:
    """16 math samples that each run into the 1 s verifier limit, on 2 verifier workers: about 8 s of work. The
    server answers 504 at 6 s, naming the key, and goes on serving."""
    started = time.monotonic()
    response = post(server, payload(inputs=[_sample(f"slow{i}", "2^{2^{2^{2^{100}}}}", "geo", "2") for i in range(16)]))
    assert response.status_code == 504, response.text
    assert "scoring 16 sample(s) took longer than reward.remote.max_request_s=6 s" in response.json()["detail"]
    assert 5.9 < time.monotonic() - started < 15
    assert post(server, payload()).json()["results"][0]["score"] == 1.0
