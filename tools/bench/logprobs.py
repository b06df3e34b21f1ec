"""Peak temporary memory and time of vocab-parallel log-probs + entropy (forward + backward), chunked vs unchunked.

Usage: python tools/bench/logprobs.py [--tokens 2048] [--vocab 32768] [--dtype bf16] [--temperature 0.7]
                                      [--chunk-sizes 1024,4096,8192] [--repeats 3] [--device cpu]
                                      [--compare-file OLD_vocab_parallel.py]

One process, one rank: logits [T, V] (the vocabulary slice of one TP rank) are made before measuring, then
vocab_parallel_logprobs_and_entropy runs forward and backward of sum(w1 * logprob + w2 * entropy) for every
chunk size and once unchunked (chunk_size = V, one pass over the whole slice). Per variant it prints
  peak     the most bytes that tensors created by the call held at once, measured by AllocationTracker (below):
           temporaries plus what the call returns (the [T, V] gradient in the logits' dtype, [T] outputs); the
           logits themselves are not counted. On CUDA also torch.cuda.max_memory_allocated above the logits;
  largest  the largest float32 (or float64) tensor the call created, in elements and as a share of T * V (with
           fp32 logits the returned gradient is one of T * V: run the default bf16 to see the temporaries);
  time     best of --repeats wall times, measured without the tracker, the variants interleaved;
and the ratios of peak and time to the unchunked run. --compare-file runs another file's
vocab_parallel_logprobs_and_entropy (without chunk_size; say `git show REV:megatron_minio3/parallel/vocab_parallel.py`
saved to a file) as one more row. Figures are recorded in docs/algorithms.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import weakref
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """Records every tensor storage that an aten op creates while the mode is active (forward and backward).

    An op's output is new memory when its storage is none of the op's tensor arguments' storages (views and
    in-place or out= results alias an argument). `allocations` lists (dtype, numel) of each new storage in
    order; `live_bytes` follows them until they are freed (a finalizer on the storage object, which torch keeps
    alive as long as the storage itself), and `peak_bytes` is the most held at once. Tensors that existed before
    the mode started are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[torch.dtype, int]] = []
        self.live_bytes = 0
        self.peak_bytes = 0

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        argument_storages = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.untyped_storage().nbytes() > 0
        }
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in argument_storages:
                continue
            argument_storages.add(storage.data_ptr())  # two outputs on one storage count once
            self.allocations.append((t.dtype, nbytes // t.element_size()))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, nbytes)
        return out

    def largest(self, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> int:
        """Elements of the largest new storage of one of `dtypes` (0 if none)."""
        return max((numel for dtype, numel in self.allocations if dtype in dtypes), default=0)


def make_inputs(num_tokens: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits_TV = (3 * torch.randn(num_tokens, vocab, generator=generator)).to(device=device, dtype=dtype)
    targets_T = torch.randint(0, vocab, (num_tokens,), generator=generator).to(device)
    weights_2T = torch.randn(2, num_tokens, generator=generator).to(device)
    return logits_TV.requires_grad_(True), targets_T, weights_2T


def forward_backward(function: Callable, logits_TV: Tensor, targets_T: Tensor, weights_2T: Tensor,
                     temperature: float) -> None:
    logits_TV.grad = None
    logprobs_T, entropy_T = function(logits_TV, targets_T, temperature)
    (weights_2T[0] * logprobs_T + weights_2T[1] * entropy_T).sum().backward()


def measure_memory(function: Callable, inputs, temperature: float) -> dict:
    """Peak bytes of one forward + backward under AllocationTracker (and torch.cuda's peak on CUDA)."""
    logits_TV = inputs[0]
    cuda = logits_TV.is_cuda
    forward_backward(function, *inputs, temperature)  # warm-up
    logits_TV.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with AllocationTracker() as tracker:
        forward_backward(function, *inputs, temperature)
    result = {"peak_bytes": tracker.peak_bytes, "largest_float": tracker.largest()}
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    logits_TV.grad = None
    return result


def time_once(function: Callable, inputs, temperature: float) -> float:
    cuda = inputs[0].is_cuda
    inputs[0].grad = None
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward_backward(function, *inputs, temperature)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load_function(path: str) -> Callable:
    spec = importlib.util.spec_from_file_location("compared_vocab_parallel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vocab_parallel_logprobs_and_entropy


def main() -> None:
    from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768, help="columns of the slice (V_local)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--chunk-sizes", default="1024,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-file", help="a vocab_parallel.py whose function takes no chunk_size")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    inputs = make_inputs(args.tokens, args.vocab, dtype, args.device)
    full = args.tokens * args.vocab
    print(f"T={args.tokens} V_local={args.vocab} {args.dtype} logits ({full * inputs[0].element_size() / 2**20:.0f} "
          f"MiB), temperature {args.temperature}, device {args.device}, torch threads {torch.get_num_threads()}")

    variants = [("unchunked", partial(vocab_parallel_logprobs_and_entropy, chunk_size=args.vocab))]
    variants += [(f"chunk {int(c)}", partial(vocab_parallel_logprobs_and_entropy, chunk_size=int(c)))
                 for c in args.chunk_sizes.split(",")]
    if args.compare_file:
        variants.append((f"compare {args.compare_file}", load_function(args.compare_file)))
    results = [measure_memory(function, inputs, args.temperature) for _, function in variants]
    for result in results:
        result["seconds"] = float("inf")
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every variant alike
        for (_, function), result in zip(variants, results):
            result["seconds"] = min(result["seconds"], time_once(function, inputs, args.temperature))
    baseline = results[0]
    for (name, _), result in zip(variants, results):
        line = (f"{name:>14}: peak {result['peak_bytes'] / 2**20:8.1f} MiB"
                f" (x{result['peak_bytes'] / baseline['peak_bytes']:.3f})"
                f"  largest float tensor {result['largest_float']:>11,} elements"
                f" ({result['largest_float'] / full:.4f} T*V)"
                f"  time {result['seconds'] * 1e3:8.1f} ms (x{result['seconds'] / baseline['seconds']:.2f})")
        if "cuda_peak_bytes" in result:
            line += (f"  cuda peak {result['cuda_peak_bytes'] / 2**20:8.1f} MiB"
                     f" (x{result['cuda_peak_bytes'] / baseline['cuda_peak_bytes']:.3f})")
        print(line, flush=True)

if __name__ == "__main__":
    main()
