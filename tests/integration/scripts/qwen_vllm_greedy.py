"""Greedy generation with vLLM CPU from HF checkpoint directories, one engine after the other in this process.

    python qwen_vllm_greedy.py OUT.json CKPT_DIR [CKPT_DIR ...] [--max-tokens 24]

Prompts: a two-turn chat with two images of different sizes and text around them, and a text-only chat.
Writes {ckpt: [{"token_ids", "logprobs", "prompt_logprobs"} per prompt]} (logprobs of the chosen tokens).
"""
from __future__ import annotations

import argparse
import gc
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from megatron_minio3.models.qwen2_5_vl.parity import DEFAULT_PROMPT, multi_image_messages, synthetic_images

    processor = AutoProcessor.from_pretrained(args.ckpts[0])
    images = synthetic_images()
    two_images = processor.apply_chat_template(
        multi_image_messages(len(images), DEFAULT_PROMPT), add_generation_prompt=True, tokenize=False
    )
    text_only = processor.apply_chat_template(
        [{"role": "user", "content": "Where is the small red sign? Answer inside <answer> tags."}],
        add_generation_prompt=True, tokenize=False,
    )
    requests = [{"prompt": two_images, "multi_modal_data": {"image": images}}, {"prompt": text_only}]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    results = {}
    for ckpt in args.ckpts:
        llm = LLM(
            model=ckpt,
            dtype="float32",
            max_model_len=2048,
            kv_cache_memory_bytes=256 << 20,  # explicit: a share of free RAM can come out negative on a loaded machine
            limit_mm_per_prompt={"image": 2},
            enforce_eager=True,
            seed=0,
        )
        results[ckpt] = [
            {
                "token_ids": list(out.outputs[0].token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)],
                "prompt_logprobs": [
                    None if lp is None else lp[t].logprob for lp, t in zip(out.prompt_logprobs, out.prompt_token_ids)
                ],
            }
            for out in llm.generate(requests, params, use_tqdm=False)
        ]
        del llm
        gc.collect()
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
