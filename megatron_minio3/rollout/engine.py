"""An in-process vLLM engine driven by its own thread, awaitable from asyncio, with in-place weight updates.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is imported) so that
`update_weights` can hand tensors to the model's `reload_weights` directly. One thread owns the engine: it
adds requests as they arrive, steps the engine while any request is unfinished, and resolves each
request's future the moment it finishes. `generate` is therefore fully asynchronous, the same contract as
vLLM's AsyncLLM: a trajectory's next turn can be submitted while other requests are still decoding.
With an accelerator, a second thread renders requests (vLLM's input processing: the image processor, multimodal
caches) in arrival order before they reach the engine thread, as AsyncLLM does on its renderer
pool, so the thread that drives the model does not hold it up while the accelerator works. On CPU the engine
thread renders them itself: there the model's own work holds the GIL, and a render thread measured no faster and
split arrivals over more engine steps (docs/rollout.md). `stats()` gives what a phase cost: engine busy time,
prompt tokens computed versus found in the prefix cache, images sent versus run through the encoder.
Scripts that create an engine need an `if __name__ == "__main__":` guard (vLLM may spawn processes).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from megatron_minio3.config.rollout import RolloutConfig
from megatron_minio3.rollout.agent_loop import GenerationRequest, GenerationResult
from megatron_minio3.rollout.spmd import END, EngineGroup
from megatron_minio3.rollout.tokens import VisionSpec, load_vision_spec

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    continues: bool = False  # the request continues an earlier one (a later turn)


@dataclass
class EngineStats:
    """What the engine did since the last `VllmEngine.stats(reset=True)`."""

    requests: int = 0
    steps: int = 0
    busy_s: float = 0.0  # engine thread: stepping the model, adding requests (and rendering them, on CPU)
    prompt_tokens: int = 0  # prompt tokens of the finished requests, image pads expanded
    cached_prompt_tokens: int = 0  # of those, found in the prefix cache (not computed again)
    later_prompt_tokens: int = 0  # prompt tokens of requests continuing an earlier one (turn 2 on)
    later_cached_prompt_tokens: int = 0
    images_sent: int = 0  # images in the requests (a trajectory sends every image of its context each turn)
    images_encoded: int = 0  # images run through the vision encoder

    def metrics(self, wall_s: float) -> dict[str, float]:
        """rollout/engine/* metrics of this engine's work over a phase of `wall_s` seconds (they depend on timing:
        which requests meet in one engine step decides what the caches hold)."""
        return {
            "rollout/engine/prefix_cache_hit_rate": self.cached_prompt_tokens / max(self.prompt_tokens, 1),
            "rollout/engine/prefix_cache_hit_rate_later_turns":
                self.later_cached_prompt_tokens / max(self.later_prompt_tokens, 1),
            "rollout/engine/encoder_cache_hit_rate": 1.0 - self.images_encoded / max(self.images_sent, 1),
            "rollout/engine/images_encoded": float(self.images_encoded),
            "rollout/engine/busy_share": min(self.busy_s / wall_s, 1.0) if wall_s > 0 else 0.0,
            "rollout/engine/steps": float(self.steps),
        }

    def add(self, other: EngineStats) -> EngineStats:
        return EngineStats(**{name: getattr(self, name) + getattr(other, name) for name in self.__dataclass_fields__})


CPU_MAX_BATCHED_TOKENS = 8192  # tokens per engine step on CPU, where prompts are never split (see below)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_args_from_config(
    cfg: RolloutConfig, model_path: str, max_images: int, *, external_launcher: bool = False,
    priority_scheduling: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of vllm.EngineArgs for this rollout configuration. `external_launcher`: the engine
    spans tensor_parallel_size ranks of the caller's torch.distributed world (rollout/spmd.py).
    `priority_scheduling`: requests are scheduled by GenerationRequest.priority (lower first), then by arrival;
    otherwise by arrival alone (vLLM ignores the priority)."""
    args: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_total_tokens,
        "limit_mm_per_prompt": {"image": max_images, "video": 0},
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "seed": cfg.seed,
        "enforce_eager": cfg.enforce_eager,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "max_num_seqs": cfg.max_num_seqs,
        "logprobs_mode": cfg.logprobs_mode,
        "enable_sleep_mode": cfg.enable_sleep_mode,
        "disable_log_stats": True,
        "scheduling_policy": "priority" if priority_scheduling else "fcfs",
    }
    if cfg.kv_cache_memory_mb > 0:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_memory_mb << 20
    if not _cuda_available():
        # A request prefilled in chunks has its generator rewound after each partial step, which torch's CPU
        # generators cannot do ("CPU Generator does not use offset") for requests with a seed of their own
        # (rollout/seeds.py): on CPU every prompt is prefilled in one step.
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(cfg.max_total_tokens, CPU_MAX_BATCHED_TOKENS)
    if external_launcher:
        args["distributed_executor_backend"] = "external_launcher"  # this rank's shard, in this process
    elif cfg.tensor_parallel_size == 1:
        args["distributed_executor_backend"] = "uni"  # keep the model in this process
    return args


class VllmEngine:
    """One vLLM engine for the agent loop (implements agent_loop.GenerationEngine)."""

    def __init__(self, cfg: RolloutConfig, model_path: str | Path, *, max_images: int | None = None,
                 group: EngineGroup | None = None, render_thread: bool | None = None,
                 priority_scheduling: bool = False):
        """`group`: this engine spans the ranks of an EngineGroup (rollout/spmd.py); every rank of the group
        constructs its VllmEngine at the same time. The leader serves `generate`; the others `follow`.
        `render_thread`: render requests on a thread of their own (default: where CUDA is available).
        `priority_scheduling`: schedule by GenerationRequest.priority, then arrival (overlapping rounds: the
        current round's turns go before the next round's); otherwise by arrival."""
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "VLLM_ENABLE_V1_MULTIPROCESSING is set to a non-zero value; the rollout engine runs vLLM in "
                "process (in-place weight updates need it): unset it or set it to 0"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not Path(model_path, "config.json").is_file():
            raise ValueError(f"rollout model path {model_path}: no config.json there (not an HF checkpoint)")
        self.cfg = cfg
        self.model_path = str(model_path)
        self.vision: VisionSpec = load_vision_spec(model_path)
        if group is not None and group.size != cfg.tensor_parallel_size:
            raise ValueError(f"an engine group of {group.size} ranks needs rollout.tensor_parallel_size={group.size}")
        self.group = group
        self._calls: list[tuple] = []  # engine calls since the last step, for the followers (leader only)
        self._engine_args = engine_args_from_config(cfg, self.model_path, max_images or cfg.max_images,
                                                    external_launcher=group is not None,
                                                    priority_scheduling=priority_scheduling)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._failure: BaseException | None = None
        self._updating = False
        self._stats = EngineStats()
        self._render_inline = not (_cuda_available() if render_thread is None else render_thread)
        # One thread, so requests are rendered in arrival order: vLLM's processor cache on the rendering side and
        # its mirror in the engine core must see the same sequence of images.
        self._render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-render")
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="vllm-engine", daemon=True)
        self._thread.start()
        self._engine = started.result()  # re-raises a start-up failure here
        self.block_size: int = self._engine.vllm_config.cache_config.block_size  # the prefix cache's granularity
        self._call(lambda engine: engine.collective_rpc(_count_encoded_images))

    # ------------------------------------------------------------------ engine thread

    def _serve(self, started: concurrent.futures.Future) -> None:
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine

            if self.group is not None:
                _name_external_launcher_run()
            engine = LLMEngine.from_engine_args(EngineArgs(**self._engine_args))
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which re-raises it
            started.set_exception(exc)
            return
        started.set_result(engine)
        while True:
            busy = engine.has_unfinished_requests()
            try:
                command = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                command = None
            if command is _STOP:
                engine.engine_core.shutdown()
                return
            if command is not None:
                command()
                continue  # drain every queued command before the next step
            started_step = time.perf_counter()
            try:
                if self.group is not None:  # the followers make the same calls, then step with us
                    self.group.publish(self._calls)
                    self._calls = []
                outputs = engine.step()
            except BaseException as exc:  # noqa: BLE001 - every waiter gets the error
                self._fail_all(exc)
                return
            self._stats.steps += 1
            for output in outputs:
                if output.finished:
                    self._count_prompt(output)
                    self._resolve(output.request_id, result=self._to_result(output))
            self._stats.busy_s += time.perf_counter() - started_step

    def _count_prompt(self, output: Any) -> None:
        stats = self._stats
        prompt, cached = len(output.prompt_token_ids), output.num_cached_tokens or 0
        stats.prompt_tokens += prompt
        stats.cached_prompt_tokens += cached
        pending = self._pending.get(output.request_id)
        if pending is not None and pending.continues:
            stats.later_prompt_tokens += prompt
            stats.later_cached_prompt_tokens += cached

    def _resolve(self, request_id: str, *, result: Any = None, error: BaseException | None = None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            _deliver(pending.loop, pending.future, result=result, error=error)

    def _fail_all(self, exc: BaseException) -> None:
        self._failure = exc
        for request_id in list(self._pending):
            self._resolve(request_id, error=RuntimeError(f"vLLM engine failed: {exc!r}"))

    @staticmethod
    def _to_result(output: Any) -> GenerationResult:
        completion = output.outputs[0]
        logprobs = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
        return GenerationResult(
            token_ids=list(completion.token_ids),
            logprobs=logprobs,
            text=completion.text,
            finish_reason=str(completion.finish_reason),
            prompt_token_ids=list(output.prompt_token_ids),
            num_cached_tokens=output.num_cached_tokens or 0,
        )

    def _call(self, function: Callable[[Any], Any]) -> Any:
        """Run function(engine) on the engine thread and return its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("VllmEngine._call from the engine thread would deadlock")
        if self._failure is not None:
            raise RuntimeError(f"vLLM engine failed earlier: {self._failure!r}")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(function(self._engine))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                done.set_exception(exc)

        self._commands.put(run)
        return done.result()

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self) -> Any:
        return self._engine.get_tokenizer()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if self._failure is not None:
            raise RuntimeError(f"vLLM engine failed earlier: {self._failure!r}")
        if self._updating:
            raise RuntimeError("generate() called while update_weights() is running")
        params = SamplingParams(
            n=1,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            top_k=request.sampling.top_k,
            max_tokens=request.max_tokens,
            stop=list(request.stop),
            include_stop_str_in_output=True,
            logprobs=0,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
            # -100 is vLLM's strongest bias; it enters the processed log-probs like the sampling does.
            logit_bias={token_id: -100.0 for token_id in request.banned_token_ids} or None,
            structured_outputs=StructuredOutputsParams(regex=request.guided_regex) if request.guided_regex else None,
            seed=request.seed,  # a stream of its own: the same tokens whatever else the engine runs
        )
        prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_token_ids}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
            if request.image_ids:  # content ids computed once per image: vLLM need not hash every image each turn
                prompt["multi_modal_uuids"] = {"image": list(request.image_ids)}
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = request.request_id
        pending = _Pending(loop, future, continues=request.continues)

        def add(engine: Any, rendered: Any) -> None:
            if future.done():  # cancelled while it was being rendered
                return
            started = time.perf_counter()
            self._pending[request_id] = pending
            try:
                engine.add_request(request_id, rendered, params, priority=request.priority)
            except BaseException as exc:  # noqa: BLE001 - a bad request fails only its own caller
                self._resolve(request_id, error=exc)
                return
            finally:
                self._stats.busy_s += time.perf_counter() - started
            self._stats.requests += 1
            self._stats.images_sent += len(request.images)
            if self.group is not None:  # the followers render the request as given themselves
                self._calls.append(("add", request_id, {**prompt}, params, request.priority))

        def render() -> None:
            started = time.perf_counter()
            try:
                rendered = self._render(prompt)
            except BaseException as exc:  # noqa: BLE001 - a bad request fails only its own caller
                _deliver(loop, future, error=exc)
                return
            finally:
                if self._render_inline:  # the engine thread's own time
                    self._stats.busy_s += time.perf_counter() - started
            if self._render_inline:
                add(self._engine, rendered)
            else:
                self._commands.put(lambda: add(self._engine, rendered))

        if self._render_inline:
            self._commands.put(render)
        else:
            self._render_pool.submit(render)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (e.g. another trajectory failed): free the slot
            self._commands.put(lambda: self._abort(request_id))
            raise

    def _render(self, prompt: dict[str, Any]) -> Any:
        """vLLM's rendering of a prompt (multimodal processing, its caches): what add_request then takes as is."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self._engine.renderer
        (rendered,) = renderer.render_cmpl([parse_model_prompt(self._engine.model_config, prompt)],
                                           renderer.default_cmpl_tok_params)
        return rendered

    def _abort(self, request_id: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self._engine.abort_request([request_id])
            if self.group is not None:
                self._calls.append(("abort", request_id))

    # ------------------------------------------------------------------ engines spanning several ranks

    def release_followers(self) -> None:
        """Leader: end the followers' `follow` (after the calls not yet published). Call it when a rollout phase
        (a generation round, the probe, an evaluation) is over."""
        if self.group is None:
            return

        def publish_end(engine: Any) -> None:
            self.group.publish([*self._calls, END])
            self._calls = []

        self._call(publish_end)

    def follow(self) -> int:
        """Follower: make the leader's engine calls and steps until it releases us; returns the steps made."""
        if self.group is None or self.group.is_leader:
            raise RuntimeError("follow() is for the non-leading ranks of an engine group")

        def run(engine: Any) -> int:
            steps = 0
            while True:
                calls = self.group.receive()
                for call in calls:
                    if call[0] == "add":
                        request_id, prompt, params, priority = call[1:]
                        engine.add_request(request_id, prompt, params, priority=priority)
                    elif call[0] == "abort":
                        engine.abort_request([call[1]])
                if END in calls:
                    return steps
                engine.step()
                steps += 1

        return self._call(run)

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Load HF-named tensors into the running engine in place, bucket by bucket, then drop every cache
        computed with the old weights (prefix KV, encoder outputs, processed images). Call it between rollout
        phases (no request may be in flight). Returns the number of tensors loaded."""
        if self._call(lambda engine: engine.has_unfinished_requests()):
            raise RuntimeError("update_weights() called while requests are in flight")
        bucket_limit = self.cfg.weight_bucket_mb << 20
        self._updating = True
        try:
            num_tensors = 0
            bucket: list[tuple[str, Any]] = []
            bucket_bytes = 0
            for name, tensor in named_tensors:
                bucket.append((name, tensor))
                bucket_bytes += tensor.numel() * tensor.element_size()
                num_tensors += 1
                if bucket_bytes >= bucket_limit:
                    self._reload(bucket)
                    bucket, bucket_bytes = [], 0
            self._reload(bucket, finish=True)  # the last reload, the tied lm_head and the caches: one hand-off
        finally:
            self._updating = False
        return num_tensors

    def reset_caches(self) -> None:
        """Drop the prefix KV cache, cached encoder outputs and processed images (between phases only)."""
        self._render_pool.submit(lambda: None).result()  # every request rendered so far has reached the engine
        self._call(_reset_caches)

    def stats(self, *, reset: bool = False) -> EngineStats:
        """What the engine did since the last reset (see EngineStats); images_encoded is counted by the model."""

        def read(engine: Any) -> EngineStats:
            encoded = engine.collective_rpc(_count_encoded_images, kwargs={"reset": reset})[0]
            stats = EngineStats(**{**self._stats.__dict__, "images_encoded": encoded})
            if reset:
                self._stats = EngineStats()
            return stats

        return self._call(read)

    def _reload(self, bucket: list[tuple[str, Any]], *, finish: bool = False) -> None:
        """One call on the engine thread: vLLM's in-place reload of `bucket` (if any); with `finish`, then the
        tied lm_head repack and the cache resets that end an update. vLLM's two warnings about what a reload
        call did not bring are dropped for the duration of the call (see _partial_reload_warnings_dropped)."""

        def run(engine: Any) -> None:
            if bucket:
                with _partial_reload_warnings_dropped():
                    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
            if finish:
                engine.collective_rpc(_repack_tied_lm_head)
                _reset_caches(engine)

        self._call(run)

    @property
    def supports_sleep(self) -> bool:
        from vllm.platforms import current_platform

        return self.cfg.enable_sleep_mode and current_platform.is_sleep_mode_available()

    def sleep(self, level: int = 1) -> bool:
        """Free accelerator memory between rollout phases; False (and nothing done) where unsupported."""
        if not self.supports_sleep:
            logger.debug("sleep mode unavailable here (rollout.enable_sleep_mode=%s); engine stays awake",
                        self.cfg.enable_sleep_mode)
            return False
        self._call(lambda engine: engine.sleep(level))
        return True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back what sleep freed: tags=["weights"] first (room to load new weights), then
        ["kv_cache"]; None brings back everything. False (and nothing done) where sleep is unsupported."""
        if not self.supports_sleep:
            return False
        self._call(lambda engine: engine.wake_up(list(tags) if tags is not None else None))
        return True

    def shutdown(self) -> None:
        self._render_pool.shutdown(wait=True)
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join()
        for request_id in list(self._pending):
            self._resolve(request_id, error=RuntimeError("vLLM engine shut down"))


def _name_external_launcher_run() -> None:
    """Give this run's external-launcher engines their own shared-memory names.

    vLLM CPU's tensor-parallel communicator names its /dev/shm segments after the worker's
    distributed_init_method, which the external launcher always sets to "env://": every run on a machine (two
    engineers' test runs, or a run after one that was killed and left its segments) would open the same
    segments ("create shm in SHMManager failed. errno: 17", or worse, shared buffers). With torch.distributed
    already initialised the method is not used to connect, so name it after this run's rendezvous port, which
    every rank of the world shares and no other live run on the host has."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    if getattr(ExecutorWithExternalLauncher._distributed_args, "names_the_run", False):
        return
    original = ExecutorWithExternalLauncher._distributed_args

    def distributed_args(self):
        _, rank, local_rank = original(self)
        run = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ['MASTER_PORT']}".replace("/", "_")
        return f"file:///minio3-{run}", rank, local_rank  # the CPU worker takes the basename as the shm prefix

    distributed_args.names_the_run = True
    ExecutorWithExternalLauncher._distributed_args = distributed_args


# vLLM's in-place reload (vllm 0.32, vllm/model_executor/model_loader/reload/) judges each reload call on its own:
#   layerwise.py:266  "<module class>: Failed to load weights": a module with tensors of its own that got none in
#                     this call; vLLM puts its current tensors back untouched.
#   inplace.py:120    "Following weights were not loaded from checkpoint: {...}": every model parameter whose
#                     name this call's load_weights did not return.
# A weight sync is one reload call per bucket, so each call reports every module and parameter that comes in
# another bucket (the second message lists nearly the whole model). And even a reload of the whole checkpoint
# in one call reports the modules whose only tensors are buffers no checkpoint holds (RotaryEmbedding,
# MRotaryEmbedding: cos/sin caches; FusedMMInputNorm: the image mean/std): they keep their values, as they should.
# Neither message means a tensor of the sync was left unloaded: the exporter sends every checkpoint tensor and
# never splits a module between buckets (vLLM would re-create a split module from part of its tensors, and says
# so only at DEBUG level, "Delayed processing"; see weights/sync.check_bucket_stays_whole), and
# tests/integration/test_weight_load_complete.py checks, name by name (the weights held by vLLM CPU's GEMM kernels
# included), that every parameter holds the synced value afterwards. So _reload drops exactly these two records,
# only around its own reload call.
_PARTIAL_RELOAD_WARNINGS = frozenset({
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights"),
    ("vllm.model_executor.model_loader.reload.inplace", "Following weights were not loaded from checkpoint: %s"),
})


@contextlib.contextmanager
def _partial_reload_warnings_dropped() -> Iterator[None]:
    """Drop exactly vLLM's two per-call reload warnings (above) while our reload call runs; every other record
    passes, and with vLLM logging at DEBUG (VLLM_LOGGING_LEVEL=DEBUG) these two pass too."""
    if logging.getLogger("vllm").isEnabledFor(logging.DEBUG):
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        return (record.name, record.msg) not in _PARTIAL_RELOAD_WARNINGS

    loggers = [logging.getLogger(name) for name in sorted({name for name, _ in _PARTIAL_RELOAD_WARNINGS})]
    for reload_logger in loggers:
        reload_logger.addFilter(keep)
    try:
        yield
    finally:
        for reload_logger in loggers:
            reload_logger.removeFilter(keep)


def _repack_tied_lm_head(worker: Any) -> list[str]:
    """vLLM CPU computes each lm_head with a copy of its weight prepacked after loading. An in-place reload
    re-processes only the modules it loads; a tied lm_head (sharing embed_tokens' weight, never loaded itself)
    would keep the old packed copy, so repack it. A no-op for untied models and on GPU."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    model = worker.model_runner.get_model()
    embeddings = {m.weight.data_ptr() for m in model.modules() if type(m) is VocabParallelEmbedding}
    repacked = []
    for name, module in model.named_modules():
        if (
            isinstance(module, ParallelLMHead)
            and isinstance(module.quant_method, UnquantizedEmbeddingMethod)
            and module.weight.data_ptr() in embeddings
        ):
            module.quant_method.process_weights_after_loading(module)
            repacked.append(name)
    return repacked


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result: Any = None,
             error: BaseException | None = None) -> None:
    """Resolve an asyncio future from another thread (nothing if it was cancelled or its loop is closed)."""

    def deliver() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the caller's event loop is closed: nobody waits for this result any more
        pass


def _count_encoded_images(worker: Any, reset: bool = False) -> int:
    """Count the images the model's vision tower encodes. The first call wraps the model's image-input method;
    later calls return the count (and zero it with `reset`). Runs on every worker (collective_rpc)."""
    model = worker.model_runner.get_model()
    if not hasattr(model, "_minio3_images_encoded"):
        original = model._process_image_input

        def counted(image_input: Any, *args: Any, **kwargs: Any) -> Any:
            model._minio3_images_encoded += len(image_input["image_grid_thw"])
            return original(image_input, *args, **kwargs)

        model._minio3_images_encoded = 0
        model._process_image_input = counted
    count = model._minio3_images_encoded
    if reset:
        model._minio3_images_encoded = 0
    return count


def _reset_caches(engine: Any) -> None:
    engine.reset_prefix_cache()
    engine.reset_mm_cache()
    engine.reset_encoder_cache()
