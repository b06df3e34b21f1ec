"""Greedy generation with vLLM CPU from a checkpoint directory, one image per prompt; prints JSON lines.

Usage: python vllm_generate.py CKPT_DIR IMAGE.png [IMAGE.png ...] --max-tokens 12
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n<|im_start|>assistant\n"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()

    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.ckpt,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 << 20,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=True,
        seed=0,
    )
    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": Image.open(p).convert("RGB")}} for p in args.images]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0)
    for out in llm.generate(requests, params, use_tqdm=False):
        completion = out.outputs[0]
        print("RESULT " + json.dumps({
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)],
        }))


if __name__ == "__main__":
    main()
