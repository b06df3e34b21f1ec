"""Reward server: `python -m megatron_minio3.rewards.server [--config FILE] [key=value ...] [--host H] [--port P]`.

Runs a RewardManager behind HTTP for expensive verifiers (the LLM judge), so many trainer processes share
one judge cache and one concurrency limit. The server's `reward` config decides verifiers, weights and
the judge; the judge key stays in the server's environment.

- GET /health -> {"status": "ok"} (no token needed)
- POST /score {"inputs": [RewardInput...], "validation": bool, "step": int, "total_steps": int}
  -> {"results": [RewardResult...]}; failed samples come back with "failed": true and an "error".
  A body larger than `reward.remote.max_request_bytes` is refused with HTTP 413 before it is parsed; a
  rule-based verifier that takes longer than `reward.verifier_timeout_s` on a sample is stopped and that
  sample comes back failed (the server goes on); a request whose scoring takes longer than
  `reward.remote.max_request_s` is answered with HTTP 504 (its samples fail on the trainer's side, with that reason).
Bound to 127.0.0.1 by default. When the environment variable named by --token-env is set, /score requires
`Authorization: Bearer <token>`; binding to a non-loopback address without a token is refused.
"""
import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import os
import sys

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from megatron_minio3.config import load_config
from megatron_minio3.config.reward import RewardConfig
from megatron_minio3.rewards.manager import RewardManager
from megatron_minio3.rewards.types import RewardInput

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "MINIO3_REWARD_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class BodySizeLimit:
    """ASGI middleware: HTTP 413 for a request body over `max_bytes`, declared (Content-Length) or streamed
    (chunked); the body is never read past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> HTTPException:
        return HTTPException(
            status_code=413,
            detail=f"request body {size} is larger than reward.remote.max_request_bytes={self.max_bytes}; "
                   "send fewer samples per request",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            detail = self._too_large(f"of {int(declared)} bytes").detail
            return await JSONResponse(status_code=413, content={"detail": detail})(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"of more than {self.max_bytes} bytes")  # FastAPI answers it as 413
            return message

        await self.app(scope, limited_receive, send)


class InputModel(BaseModel):
    """A RewardInput as JSON; strict types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)
    uid: str
    data_source: str
    question: str
    ground_truth: str
    turns: list[str]
    num_tool_calls: int = Field(default=0, ge=0)
    num_tool_errors: int = Field(default=0, ge=0)
    verifier: str | None = None


class ScoreRequest(BaseModel):
    """Body of POST /score."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: list[InputModel]
    validation: bool
    step: int = Field(default=0, ge=0)
    total_steps: int = Field(default=1, ge=1)


def build_app(cfg: RewardConfig, token: str):
    """The FastAPI app scoring with `cfg`; `token` ("" = none) guards /score."""
    cfg = dataclasses.replace(cfg, remote=dataclasses.replace(cfg.remote, urls=[]))  # this server scores itself
    manager = RewardManager(cfg)

    def require_token(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(title="megatron_minio3 reward server")
    app.add_middleware(BodySizeLimit, max_bytes=cfg.remote.max_request_bytes)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/score", dependencies=[Depends(require_token)])
    async def score(request: ScoreRequest):
        inputs = [RewardInput(**item.model_dump()) for item in request.inputs]
        limit = cfg.remote.max_request_s
        try:
            results = await asyncio.wait_for(
                manager.score(inputs, validation=request.validation, step=request.step,
                              total_steps=request.total_steps),
                timeout=limit if limit > 0 else None,
            )
        except ValueError as exc:
            return JSONResponse(status_code=400, content={"detail": str(exc)})
        except asyncio.TimeoutError:
            return JSONResponse(status_code=504, content={"detail": (
                f"scoring {len(inputs)} sample(s) took longer than reward.remote.max_request_s={limit:g} s "
                "(a slow judge, or a verifier stuck); send fewer samples per request or raise the limit")})
        return {"results": [result.to_dict() for result in results]}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the run's YAML config (its `reward:` section is used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reward.judge.model=gpt-4o")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument(
        "--token-env", default=None,
        help="NAME of the environment variable holding the bearer token (default: the config's "
             f"reward.remote.token_env, {DEFAULT_TOKEN_ENV} unless set), so one config configures both ends",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from megatron_minio3.trainer.prelaunch import prelaunch

    try:
        cfg = load_config(args.config, args.overrides)
        reward_cfg = cfg.reward
    except ValueError as exc:  # ConfigError included
        print(f"reward server: bad configuration: {exc}", file=sys.stderr)
        return 2
    token_env = args.token_env if args.token_env is not None else reward_cfg.remote.token_env
    token = os.environ.get(token_env, "") if token_env else ""
    if not token and not is_loopback(args.host):
        print(
            f"refusing to serve on non-loopback address {args.host!r} without a bearer token: "
            f"set the environment variable {token_env} (reward.remote.token_env, or --token-env)",
            file=sys.stderr,
        )
        return 2
    try:
        prelaunch(cfg, "reward_server")  # every verifier can be built: names, the judge's variables
        app = build_app(reward_cfg, token)
    except ValueError as exc:
        print(f"reward server: bad configuration: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    logger.info("reward server on %s:%d (token %s)", args.host, args.port, "required" if token else "not required")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
