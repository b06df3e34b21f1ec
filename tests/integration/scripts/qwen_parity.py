"""torchrun worker: Megatron Qwen2.5-VL vs transformers, logits and gradients, at several TP/PP layouts.

    torchrun --nproc_per_node N qwen_parity.py --out RESULTS.json --work-dir DIR \
        --ckpt NAME@TPxPP=HF_DIR [...] --layouts 1x1,2x1,1x2 --grad-layouts 2x1,1x2

Per checkpoint: convert HF -> Megatron at the given TPxPP (TP*PP = N), export that Megatron checkpoint back
to HF (rank 0, into DIR/NAME_exported, small shards), then for each layout load the Megatron checkpoint into
a freshly built model and compare, against transformers fp32 (eager attention):
* logits of two micro-batches through megatron's pipeline schedule: one sequence with two images of
  different sizes and text around them; a right-padded batch of two sequences with 2 and 1 images;
* (grad layouts) gradients of the summed next-token cross-entropy of the first micro-batch, for every
  parameter of the rank, against HF's gradients mapped through the conversion rules;
* (grad layouts) freeze switches: frozen parts get no gradient, the others do.
Rank 0 writes one JSON list of records.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--ckpt", action="append", required=True, help="NAME@TPxPP=HF_DIR (conversion layout)")
    parser.add_argument("--layouts", default="1x1")
    parser.add_argument("--grad-layouts", default="")
    return parser.parse_args()


def layouts(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def shifted_labels(input_ids_BS: torch.Tensor, valid_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels and the mask of positions that have a real next token."""
    labels_BS = torch.roll(input_ids_BS, shifts=-1, dims=1)
    mask_BS = valid_BS & torch.roll(valid_BS, shifts=-1, dims=1)
    mask_BS[:, -1] = False
    return labels_BS, mask_BS


def hf_reference(hf_dir: str, parity_inputs: list) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """transformers logits of every micro-batch and gradients (by HF name) of micro-batch 0's summed loss."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = [model(**p.hf).logits.float() for p in parity_inputs]
    first = parity_inputs[0]
    labels_BS, mask_BS = shifted_labels(first.megatron.input_ids, first.valid_mask)
    logits_BSV = model(**first.hf).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), reduction="none")
    (per_token * mask_BS.flatten()).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def build_and_load(cfg, megatron_dir: str, **option_overrides):
    from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, build_model

    model = build_model(cfg, ModelOptions(**option_overrides))
    load_megatron_checkpoint(model, megatron_dir)
    return model


def train_step_grads(model, inputs) -> None:
    """One forward/backward of the summed next-token loss through megatron's pipeline schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = inputs.megatron
    labels_BS, mask_BS = shifted_labels(batch.input_ids, inputs.valid_mask)
    model.train()
    model.zero_grad(set_to_none=True)

    def forward_step(data_iterator, step_model):
        next(data_iterator)
        output = step_model(batch.input_ids, batch.position_ids, pixel_values=batch.pixel_values,
                            image_grid_thw=batch.image_grid_thw, labels=labels_BS)

        def loss_func(per_token_loss_BS):
            loss = (per_token_loss_BS * mask_BS).sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([0]), model=[model], num_microbatches=1,
        seq_length=batch.input_ids.shape[1], micro_batch_size=batch.input_ids.shape[0], forward_only=False,
    )


def sum_tied_embedding_grads(model) -> None:
    """With tied embeddings at PP>1 the first and last stage each hold a copy of the embedding; megatron's
    finalize_model_grads sums their gradients over the embedding group. This does the same for plain grads."""
    from megatron.core import parallel_state as mpu

    if not model.model_cfg.text.tie_word_embeddings or mpu.get_pipeline_model_parallel_world_size() == 1:
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is not None:
        dist.all_reduce(weight.grad, group=mpu.get_embedding_group())


def compare_grads(model, cfg, hf_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    from megatron.core import parallel_state as mpu

    from megatron_minio3.convert.megatron_checkpoint import global_named_parameters
    from megatron_minio3.convert.qwen2_5_vl import TRANSFORMERS5, hf_to_megatron, parameter_rule
    from megatron_minio3.convert.tp import split_for_rank

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    worst_relative, worst_name, num_compared = 0.0, "", 0
    for name, param in global_named_parameters(model):
        rule = parameter_rule(name, cfg, TRANSFORMERS5)
        if not rule.exported:
            continue  # the tied output layer: its gradient is summed into the embedding's by megatron
        full = hf_to_megatron(name, [hf_grads[n] for n in rule.hf_names], cfg, TRANSFORMERS5)
        expected = split_for_rank(full, rule.layout, rule.tp_dim, tp_rank, tp_size)
        assert param.grad is not None, f"{name}: no gradient"
        relative = float((param.grad - expected).abs().max()) / max(1.0, float(expected.abs().max()))
        if relative >= worst_relative:
            worst_relative, worst_name = relative, name
        num_compared += 1
    return {"max_rel_grad_diff": worst_relative, "worst_param": worst_name, "num_params": num_compared}


def freeze_record(cfg, megatron_dir: str, inputs) -> dict:
    """Per freeze setting and model part: [number of parameters with a non-zero gradient, number of parameters]."""
    record = {}
    for label, overrides in (
        ("vision+merger frozen", {"freeze_vision": True, "freeze_merger": True}),
        ("language model frozen", {"freeze_language_model": True}),
    ):
        model = build_and_load(cfg, megatron_dir, **overrides)
        train_step_grads(model, inputs)
        counts = {"vision": [0, 0], "merger": [0, 0], "language_model": [0, 0]}
        for name, param in model.named_parameters():
            if name.startswith("vision_model.merger."):
                part = "merger"
            elif name.startswith("vision_model."):
                part = "vision"
            else:
                part = "language_model"
            counts[part][0] += int(param.grad is not None and bool(param.grad.abs().sum() > 0))
            counts[part][1] += 1
        record[label] = counts
    return record


def main() -> None:
    args = parse_args()
    from megatron.core import parallel_state as mpu
    from transformers import AutoProcessor

    from megatron_minio3.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_minio3.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
    from megatron_minio3.models.qwen2_5_vl.forward import forward_logits
    from megatron_minio3.models.qwen2_5_vl.parity import (
        DEFAULT_PROMPT,
        build_parity_inputs,
        logit_difference,
        synthetic_images,
    )
    from megatron_minio3.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    records = []
    for item in args.ckpt:
        spec, hf_dir = item.split("=", 1)
        ckpt_name, convert_layout = spec.split("@")
        megatron_dir = str(Path(args.work_dir) / f"{ckpt_name}_megatron")
        init_parallel(*layouts(convert_layout)[0])
        convert_hf_to_megatron(hf_dir, megatron_dir)
        if rank == 0:
            convert_megatron_to_hf(megatron_dir, Path(args.work_dir) / f"{ckpt_name}_exported", hf_dir,
                                   max_shard_bytes=2 * 1024**2, bucket_bytes=1024**2)
        cfg = load_hf_config(hf_dir)
        processor = AutoProcessor.from_pretrained(hf_dir)
        images = synthetic_images()
        parity_inputs = [
            build_parity_inputs(processor, cfg, [(images, DEFAULT_PROMPT)]),
            build_parity_inputs(processor, cfg, [(images, "Which one is brighter?"), (images[1:], "Describe it.")]),
        ]
        hf_logits, hf_grads = hf_reference(hf_dir, parity_inputs)

        for tp, pp in layouts(args.layouts):
            init_parallel(tp, pp)
            model = build_and_load(cfg, megatron_dir)
            logits = forward_logits(model, [p.megatron for p in parity_inputs])
            if logits is not None and mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0:
                for index, (ours, reference, p) in enumerate(zip(logits, hf_logits, parity_inputs)):
                    records.append({"kind": "logits", "ckpt": ckpt_name, "tp": tp, "pp": pp, "micro_batch": index,
                                    "batch_size": int(p.valid_mask.shape[0]),
                                    **logit_difference(reference, ours, p.valid_mask)})

        for tp, pp in layouts(args.grad_layouts):
            init_parallel(tp, pp)
            model = build_and_load(cfg, megatron_dir)
            train_step_grads(model, parity_inputs[0])
            sum_tied_embedding_grads(model)
            records.append({"kind": "grads", "ckpt": ckpt_name, "tp": tp, "pp": pp, "rank": rank,
                            **compare_grads(model, cfg, hf_grads)})
            records.append({"kind": "freeze", "ckpt": ckpt_name, "tp": tp, "pp": pp, "rank": rank,
                            "first_stage": mpu.is_pipeline_first_stage(),
                            **freeze_record(cfg, megatron_dir, parity_inputs[0])})

    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        Path(args.out).write_text(json.dumps([r for part in gathered for r in part], indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
