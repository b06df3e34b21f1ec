"""HF-vs-Megatron logit parity: inputs with images and text around them, the transformers reference, the diff.

Used by tools/compare_hf_megatron.py and the parity tests. transformers is only the *reference* here; the
Megatron side gets its mrope positions from our own mrope.get_rope_index.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_minio3.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from megatron_minio3.models.qwen2_5_vl.forward import ModelInputs
from megatron_minio3.models.qwen2_5_vl.mrope import get_rope_index

DEFAULT_PROMPT = "Compare the two pictures: what is the color of the small sign, and where is it?"


def synthetic_images(seed: int = 0) -> list:
    """Two deterministic RGB images of different sizes and aspect ratios (PIL)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in ((140, 224), (252, 112)):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy(), mode="RGB"))
    return images


def multi_image_messages(num_images: int, prompt: str) -> list[dict]:
    """A two-turn conversation with text before, between and after the images."""
    content: list[dict] = [{"type": "text", "text": "Here are some pictures."}]
    for index in range(num_images):
        content.append({"type": "image"})
        content.append({"type": "text", "text": f" That was picture {index + 1}. "})
    content.append({"type": "text", "text": prompt})
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "<think> Let me look closely. </think>"}]},
        {"role": "user", "content": [{"type": "text", "text": "Answer inside <answer> tags."}]},
    ]


@dataclass
class ParityInputs:
    hf: dict  # keyword arguments for Qwen2_5_VLForConditionalGeneration.forward
    megatron: ModelInputs
    valid_mask: torch.Tensor  # [B, S] bool: real tokens (right padding is excluded from comparisons)


def build_parity_inputs(
    processor, cfg: Qwen2_5_VLConfig, samples: Sequence[tuple[Sequence, str]]
) -> ParityInputs:
    """One batch from (images, prompt) samples, right-padded; mrope positions from our get_rope_index."""
    texts = [
        processor.apply_chat_template(multi_image_messages(len(images), prompt), add_generation_prompt=True,
                                      tokenize=False)
        for images, prompt in samples
    ]
    all_images = [image for images, _ in samples for image in images]
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=all_images or None, padding=True, return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    grid = batch.get("image_grid_thw")
    position_ids, _ = get_rope_index(
        input_ids,
        grid,
        image_token_id=cfg.image_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
        attention_mask_BS=attention_mask,
    )
    return ParityInputs(
        hf=dict(batch),
        megatron=ModelInputs(
            input_ids=input_ids,
            position_ids=position_ids,
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=grid,
        ),
        valid_mask=attention_mask.bool(),
    )


def load_images(paths: Sequence[str | Path]) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


@torch.no_grad()
def hf_reference_logits(hf_dir: str | Path, hf_inputs: dict) -> torch.Tensor:
    """transformers' fp32 logits [B, S, V] (eager attention, the reference implementation)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model(**hf_inputs).logits.float()


def logit_difference(
    reference_BSV: torch.Tensor, candidate_BSV: torch.Tensor, valid_BS: torch.Tensor
) -> dict[str, float]:
    """Max/mean absolute difference over the valid (non-padding) positions."""
    if reference_BSV.shape != candidate_BSV.shape:
        raise ValueError(
            f"logit shapes differ: reference {tuple(reference_BSV.shape)} vs {tuple(candidate_BSV.shape)}"
        )
    reference_TV, candidate_TV = reference_BSV[valid_BS].float(), candidate_BSV[valid_BS].float()
    diff_TV = (reference_TV - candidate_TV).abs()
    return {
        "max_abs_diff": float(diff_TV.max()),
        "mean_abs_diff": float(diff_TV.mean()),
        "max_abs_logit": float(reference_TV.abs().max()),
        "num_tokens": int(valid_BS.sum()),
    }
