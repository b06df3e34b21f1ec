"""SFT samples: conversations rendered in the rollout's token layout, their lengths, and their packing items.

    samples = build_sft_samples(conversations, turns, data_cfg, vision, max_length)   # cheap: headers only
    item = sft_packing_item(samples[i], data_cfg, vision, images, image_token_id)      # pixels, positions

Every image goes through the rollout's resize (data.min/max_pixels, then the processor's): the images of the
first user turn with data.image_resample, the later ones (observations, i.e. crops) with data.crop_resample,
exactly as a rollout shows them. Lengths are planned from the image headers (crop_tool.model_side_size) and
checked against the decoded images when the item is built. A sample longer than `max_length` tokens is left
out and counted (cutting a multimodal chat could cut an image in half).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.data.conversation import Conversation, ImageSource, render_conversation
from megatron_minio3.data.images import ImageLoadError, resample_from_name
from megatron_minio3.config.data import IMAGE_MARKER
from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
from megatron_minio3.packing import PackingItem
from megatron_minio3.rollout.crop_tool import (
    image_grid_thw,
    model_side_size,
    num_image_tokens,
    resize_for_model,
    resize_for_processor,
)
from megatron_minio3.rollout.tokens import VisionSpec, expand_image_pads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftSample:
    uid: str
    data_source: str
    token_ids: tuple[int, ...]  # one image pad per image
    loss_mask: tuple[int, ...]
    images: tuple[ImageSource, ...]
    num_prompt_images: int  # the first user turn's images (resized with data.image_resample)
    model_sizes: tuple[tuple[int, int], ...]  # (w, h) the model sees of each image
    length: int  # tokens once the pads are expanded
    num_loss_tokens: int


def _header_size(source: ImageSource) -> tuple[int, int]:
    import io

    try:
        with Image.open(source.path if source.path is not None else io.BytesIO(source.data)) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise ImageLoadError(source.path or "<embedded bytes>", f"unreadable ({exc})") from None


def build_sft_samples(
    conversations: Sequence[Conversation], turns, data_cfg: DataConfig, vision: VisionSpec, max_length: int
) -> tuple[list[SftSample], dict[str, int]]:
    """(samples, counts of the conversations left out by reason). `turns`: the rollout's TurnTokenizer."""
    samples, left_out = [], {"too_long": 0, "image_error": 0}
    for conv in conversations:
        num_prompt_images = conv.messages[1 if conv.messages[0].role == "system" else 0].content.count(IMAGE_MARKER)
        try:
            sizes = tuple(
                model_side_size(_header_size(source), data_cfg.min_pixels, data_cfg.max_pixels, vision.min_pixels,
                                vision.max_pixels)
                for source in conv.images
            )
        except (ImageLoadError, ValueError) as exc:
            logger.warning("SFT sample %s left out: %s", conv.uid, exc)
            left_out["image_error"] += 1
            continue
        ids, mask = render_conversation(turns, conv, sizes)
        counts = [num_image_tokens(image_grid_thw(size, vision.patch_size), vision.merge_size) for size in sizes]
        length = len(ids) - len(sizes) + sum(counts)
        if length > max_length:
            left_out["too_long"] += 1
            continue
        samples.append(SftSample(conv.uid, conv.data_source, tuple(ids), tuple(mask), conv.images, num_prompt_images,
                                 sizes, length, sum(mask)))
    if any(left_out.values()):
        logger.warning("SFT: %d of %d conversations left out (%s)", sum(left_out.values()), len(conversations),
                       ", ".join(f"{k}: {v}" for k, v in left_out.items() if v))
    return samples, left_out


def model_images(sample: SftSample, data_cfg: DataConfig, vision: VisionSpec) -> list[Image.Image]:
    """The sample's images as the model sees them (the rollout's resize), checked against the planned sizes."""
    prompt_resample = resample_from_name(data_cfg.image_resample, "data.image_resample")
    crop_resample = resample_from_name(data_cfg.crop_resample, "data.crop_resample")
    out = []
    for index, (source, size) in enumerate(zip(sample.images, sample.model_sizes)):
        resample = prompt_resample if index < sample.num_prompt_images else crop_resample
        image = resize_for_model(source.load(), data_cfg.min_pixels, data_cfg.max_pixels, resample)
        image = resize_for_processor(image, vision.min_pixels, vision.max_pixels)
        if image.size != tuple(size):
            raise ValueError(f"SFT sample {sample.uid}: image {index} is {image.size} for the model, the plan said "
                             f"{tuple(size)} (did the file change?)")
        out.append(image)
    return out


def sft_packing_item(sample: SftSample, data_cfg: DataConfig, vision: VisionSpec, encoder, image_token_id: int
                     ) -> PackingItem:
    """Token ids with the pads expanded, the assistant loss mask, mrope positions and pixel rows
    (encoder: trainer.batch.ImageEncoder)."""
    images = model_images(sample, data_cfg, vision)
    grids = [image_grid_thw(image.size, vision.patch_size) for image in images]
    counts = [num_image_tokens(grid, vision.merge_size) for grid in grids]
    token_ids = expand_image_pads(sample.token_ids, counts, image_token_id)
    loss_mask = expand_image_pads_mask(sample.token_ids, sample.loss_mask, counts, image_token_id)
    ids_T = torch.tensor(token_ids, dtype=torch.long)
    grid_N3 = torch.tensor(grids, dtype=torch.long).reshape(-1, 3) if grids else None
    positions, _ = sequence_position_ids(ids_T, grid_N3, image_token_id=image_token_id,
                                         spatial_merge_size=vision.merge_size)
    return PackingItem(
        token_ids=ids_T,
        loss_mask=torch.tensor(loss_mask, dtype=torch.long),
        position_ids=positions,
        pixel_values=torch.cat([encoder.pixels(im, g) for im, g in zip(images, grids)]) if images else None,
        image_grid_thw=grid_N3,
    )


def expand_image_pads_mask(token_ids: Sequence[int], loss_mask: Sequence[int], counts: Sequence[int],
                           pad_id: int) -> list[int]:
    """The loss mask of expand_image_pads(token_ids, counts, pad_id): a pad's entry repeated for its image's tokens."""
    out, image = [], 0
    for token, mask in zip(token_ids, loss_mask):
        if token == pad_id:
            out += [mask] * counts[image]
            image += 1
        else:
            out.append(mask)
    return out
