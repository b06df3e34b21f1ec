"""Forward-only passes through megatron's pipeline schedule (any TP/PP), returning full-vocabulary logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as mpu
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class ModelInputs:
    """One micro-batch as the model takes it (see Qwen2_5_VLModel.forward for the shapes)."""

    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [3, B, S]
    pixel_values: torch.Tensor | None = None  # [num_patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]
    attention_mask: torch.Tensor | None = None  # megatron boolean mask [B, 1, S, S], True = masked

    def to(self, device: torch.device) -> "ModelInputs":
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return ModelInputs(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


@torch.no_grad()
def forward_logits(model: torch.nn.Module, micro_batches: list[ModelInputs]) -> list[torch.Tensor] | None:
    """Logits [B, S, vocab] (gathered over TP) of each micro-batch on last-stage ranks; None on other ranks."""
    model.eval()
    batches = iter(micro_batches)

    def forward_step(data_iterator, step_model):
        batch = next(data_iterator)
        output = step_model(
            batch.input_ids,
            batch.position_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            runtime_gather_output=True,
        )

        def keep_logits(output_tensor: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return output_tensor

        return output, keep_logits

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(b.input_ids.shape[1] for b in micro_batches),
        micro_batch_size=max(b.input_ids.shape[0] for b in micro_batches),
        forward_only=True,
        collect_non_loss_data=True,
    )
    return list(outputs) if mpu.is_pipeline_last_stage() else None
