"""Qwen2.5-VL on megatron-core: the vision encoder on the first pipeline stage + a GPTModel with mrope.

Module tree (these prefixes are also the distributed-checkpoint keys):
    vision_model.*     VisionEncoder (first pipeline stage only, replicated over tensor-parallel ranks)
    language_model.*   megatron.core GPTModel (position_embedding_type="mrope")
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_minio3.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from megatron_minio3.models.qwen2_5_vl.layer_spec import language_layer_spec, resolve_use_te
from megatron_minio3.models.qwen2_5_vl.vision import VisionEncoder, vision_inverse_frequencies
from megatron_minio3.parallel.context_parallel import ContextShard, ImageSharding, assign_images, gather_rows


@dataclass(frozen=True)
class ModelOptions:
    """How to build the model (the architecture itself comes from Qwen2_5_VLConfig)."""

    params_dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None: Transformer Engine when installed
    sequence_parallel: bool = False
    freeze_vision: bool = False  # patch embedding + vision blocks
    freeze_merger: bool = False  # the 2x2 merger / projector into the LLM width
    freeze_language_model: bool = False
    use_cpu_initialization: bool | None = None  # None: only when CUDA is absent
    # Activation recompute in training. "full": each decoder layer and vision block keeps only its input and
    # recomputes the rest in the backward pass (megatron recompute_granularity="full", one layer per unit);
    # "selective": only the decoder submodules in recompute_modules rerun (vision blocks still rerun whole).
    recompute_activations: bool = False
    recompute_granularity: str = "full"
    recompute_modules: tuple[str, ...] = ("core_attn", "mlp")
    perform_initialization: bool = True  # False when every weight is loaded right after (conversion)


def pipeline_layer_split(num_layers: int, pp: int) -> tuple[int, int] | None:
    """(layers on the first stage, layers on the last stage) when num_layers does not divide evenly over pp
    stages, else None. Middle stages get num_layers // pp each; the remainder goes to the two end stages,
    the last one getting the larger half (the first stage also runs the vision encoder)."""
    if pp < 1 or num_layers < pp:
        raise ValueError(f"cannot split {num_layers} decoder layers over {pp} pipeline stages")
    if num_layers % pp == 0:
        return None
    per_stage, remainder = divmod(num_layers, pp)
    return per_stage + remainder // 2, per_stage + remainder - remainder // 2


def validate_parallel_layout(cfg: Qwen2_5_VLConfig, tp: int, pp: int) -> None:
    """ValueError naming the dimension that does not split over the requested TP/PP sizes."""
    text = cfg.text
    checks = (
        ("num_attention_heads", text.num_attention_heads, tp, "tp"),
        ("num_key_value_heads", text.num_kv_heads, tp, "tp"),
        ("vocab_size", text.vocab_size, tp, "tp"),
        ("intermediate_size", text.intermediate_size, tp, "tp"),
    )
    for name, value, size, size_name in checks:
        if value % size:
            raise ValueError(f"text config {name}={value} is not divisible by {size_name}={size}")
    pipeline_layer_split(text.num_layers, pp)


def _recompute_settings(options: ModelOptions) -> dict:
    """megatron TransformerConfig fields for ModelOptions' recompute choice."""
    if not options.recompute_activations:
        return dict(recompute_granularity=None)
    if options.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if options.recompute_granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(options.recompute_modules))
    raise ValueError(f"recompute_granularity must be 'full' or 'selective', got {options.recompute_granularity!r}")


def build_transformer_config(cfg: Qwen2_5_VLConfig, options: ModelOptions) -> TransformerConfig:
    """megatron TransformerConfig equivalent to the HF Qwen2.5-VL text model."""
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    validate_parallel_layout(cfg, tp, pp)
    use_te = resolve_use_te(options.use_te)
    if options.sequence_parallel and not use_te:
        raise ValueError("model.sequence_parallel=true needs the Transformer Engine layer spec (torch norms lack it)")
    use_cpu_init = (
        not torch.cuda.is_available() if options.use_cpu_initialization is None else options.use_cpu_initialization
    )
    text = cfg.text
    uneven = pipeline_layer_split(text.num_layers, pp)
    return TransformerConfig(
        num_layers=text.num_layers,
        num_layers_in_first_pipeline_stage=None if uneven is None else uneven[0],
        num_layers_in_last_pipeline_stage=None if uneven is None else uneven[1],
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_kv_heads,
        kv_channels=text.head_dim,
        ffn_hidden_size=text.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(text.mrope_section),
        rotary_interleaved=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=options.sequence_parallel,
        params_dtype=options.params_dtype,
        pipeline_dtype=options.params_dtype,
        bf16=options.params_dtype == torch.bfloat16,
        fp16=options.params_dtype == torch.float16,
        variable_seq_lengths=True,  # pipeline stages exchange shapes: micro-batches vary in length
        moe_token_dispatcher_type="alltoall",  # dense model; megatron rejects its default with variable lengths
        use_cpu_initialization=use_cpu_init,
        perform_initialization=options.perform_initialization,
        **_recompute_settings(options),
    )


class Qwen2_5_VLModel(MegatronModule):
    """Megatron Qwen2.5-VL. forward(...) returns logits [B, S, V/tp] on the last stage
    (per-token loss [B, S] when labels are given), hidden states [S, B, H] elsewhere."""

    def __init__(
        self,
        model_cfg: Qwen2_5_VLConfig,
        options: ModelOptions,
        transformer_config: TransformerConfig,
        *,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=transformer_config)
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder
        self.vision_model = None
        if pre_process:
            device = (
                torch.device("cpu")
                if transformer_config.use_cpu_initialization
                else torch.device("cuda", torch.cuda.current_device())
            )
            # Without initialisation the weights are only allocated (they are loaded right after).
            with torch.device(device if options.perform_initialization else "meta"):
                self.vision_model = VisionEncoder(
                    model_cfg.vision, dtype=options.params_dtype, recompute=options.recompute_activations
                )
            if not options.perform_initialization:
                self.vision_model.to_empty(device=device)
                self.vision_model.inv_freq.copy_(vision_inverse_frequencies(model_cfg.vision))
        self.language_model = GPTModel(
            config=transformer_config,
            transformer_layer_spec=language_layer_spec(options.use_te),
            vocab_size=model_cfg.text.vocab_size,
            max_sequence_length=model_cfg.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model_cfg.text.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=model_cfg.text.rope_theta,
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.apply_freeze(
            vision=options.freeze_vision, merger=options.freeze_merger, language_model=options.freeze_language_model
        )

    def apply_freeze(self, *, vision: bool, merger: bool, language_model: bool) -> None:
        """requires_grad=False on the chosen parts (the SFT recipe freezes vision and merger)."""
        if self.vision_model is not None:
            for name, param in self.vision_model.named_parameters():
                frozen = merger if name.startswith("merger.") else vision
                param.requires_grad_(not frozen)
        for param in self.language_model.parameters():
            param.requires_grad_(not language_model)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Tensor | None:
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's finalize_model_grads (embedding-gradient all-reduce across pipeline stages)."""
        return self.language_model.share_embeddings_and_output_weights

    def embed(
        self, input_ids_BS: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None,
        shard: ContextShard | None = None, images: ImageSharding | None = None,
    ) -> Tensor:
        """Token embeddings [S, B, H] with the image features written at the <|image_pad|> positions.

        With a context-parallel shard (B = 1): embeddings of the shard's tokens only [T / cp, 1, H]. With an image
        group (TP x CP ranks sharing the micro-batch): each image is encoded on one of its ranks
        (context_parallel.assign_images) and the features are all-gathered."""
        is_image_BS = input_ids_BS == self.model_cfg.image_token_id
        num_image_tokens = int(is_image_BS.sum())
        cp = shard is not None and shard.cp_size > 1
        if cp:
            index_T = shard.index_T.to(input_ids_BS.device)
            embeds_SBH = self.language_model.embedding(input_ids=input_ids_BS[:, index_T], position_ids=None)
        else:
            embeds_SBH = self.language_model.embedding(input_ids=input_ids_BS, position_ids=None)
        if pixel_values is None:
            if num_image_tokens:
                raise ValueError(f"input_ids contain {num_image_tokens} image tokens but pixel_values is None")
            return embeds_SBH
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        vision_trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            if images is not None and images.size > 1:
                image_embeds_MH = self._encode_images_over_group(pixel_values, image_grid_thw, images)
            else:
                image_embeds_MH = self.vision_model(pixel_values, image_grid_thw)
        if image_embeds_MH.shape[0] != num_image_tokens:
            raise ValueError(
                f"input_ids contain {num_image_tokens} image tokens but image_grid_thw describes "
                f"{image_embeds_MH.shape[0]} image features"
            )
        if cp:  # B = 1: the image-token ordinal of every local position picks its feature row
            ordinal_T = is_image_BS[0].long().cumsum(0) - 1
            local_is_image_T = is_image_BS[0, index_T]
            seq_index = local_is_image_T.nonzero(as_tuple=True)[0]
            rows = image_embeds_MH[ordinal_T[index_T][local_is_image_T]]
            return embeds_SBH.index_put((seq_index, torch.zeros_like(seq_index)), rows.to(embeds_SBH.dtype))
        batch_index, seq_index = is_image_BS.nonzero(as_tuple=True)  # row-major: images in order
        return embeds_SBH.index_put((seq_index, batch_index), image_embeds_MH.to(embeds_SBH.dtype))

    def _encode_images_over_group(self, pixel_values: Tensor, image_grid_thw: Tensor, images: ImageSharding) -> Tensor:
        """[M, H] features of every image, in image order; this rank encodes only the images assigned to it."""
        patches = image_grid_thw.prod(dim=1).tolist()
        tokens = [n // self.model_cfg.vision.spatial_merge_size ** 2 for n in patches]
        owner = assign_images(patches, images.size)
        starts = [0, *itertools.accumulate(patches)]
        mine = [i for i, r in enumerate(owner) if r == images.rank]
        if mine:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=pixel_values.device) for i in mine])
            local_MH = self.vision_model(pixel_values[rows], image_grid_thw[mine])
        else:  # still part of the graph, so every rank takes part in the gather's backward
            anchor = next(self.vision_model.parameters())
            local_MH = anchor.new_zeros((0, self.model_cfg.text.hidden_size)) + 0 * anchor.sum()
        counts = [sum(n for n, r in zip(tokens, owner) if r == rank) for rank in range(images.size)]
        gathered_MH = gather_rows(local_MH, counts, images.group, images.replicas)
        # the gathered rows hold rank 0's images in image order, then rank 1's, ...: put them back in image order
        gathered_order = sorted(range(len(patches)), key=lambda i: (owner[i], i))
        features = dict(zip(gathered_order, gathered_MH.split([tokens[i] for i in gathered_order])))
        return torch.cat([features[i] for i in range(len(patches))])

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        packed_seq_params=None,
        labels: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> Tensor:
        """
        input_ids [B, S] (B = 1 and S = total tokens for packed THD input); position_ids [3, B, S] from
        mrope.get_rope_index (or precomputed per packed sequence); attention_mask: None for causal
        attention, else megatron's boolean mask [B, 1, S, S] (True = masked); pixel_values
        [num_patches, C*T*P*P] and image_grid_thw [num_images, 3] for the images in order of appearance;
        packed_seq_params: megatron PackedSeqParams (cu_seqlens) for THD input; an
        attention.ShardedSeqParams with a shard of cp > 1 takes the FULL stream's input_ids/position_ids
        and the LOCAL stream's cu_seqlens, and returns the local tokens' outputs [1, T / cp, ...]; with an
        image group (`images`, TP x CP ranks) each rank encodes part of the images.
        """
        if position_ids.dim() != 3 or position_ids.shape[0] != 3 or position_ids.shape[1:] != input_ids.shape:
            raise ValueError(
                f"position_ids must be [3, B, S] = [3, {', '.join(map(str, input_ids.shape))}], "
                f"got {tuple(position_ids.shape)}"
            )
        shard = getattr(packed_seq_params, "shard", None)
        images = getattr(packed_seq_params, "images", None)
        if shard is not None and shard.cp_size > 1:  # the full stream comes in; this rank computes its shard
            if input_ids.shape[0] != 1:
                raise ValueError(f"context parallelism takes one packed sequence stream (B = 1), got B = "
                                 f"{input_ids.shape[0]}")
            index_T = shard.index_T.to(input_ids.device)
            position_ids = position_ids[:, :, index_T]
        else:
            shard, index_T = None, None
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, shard, images)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(
            input_ids=input_ids if index_T is None else input_ids[:, index_T],
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
        )


def build_model(
    cfg: Qwen2_5_VLConfig, options: ModelOptions = ModelOptions(), *, vp_stage: int | None = None
) -> Qwen2_5_VLModel:
    """The model provider: this rank's pipeline stage of Qwen2.5-VL (call after init_parallel)."""
    transformer_config = build_transformer_config(cfg, options)
    return Qwen2_5_VLModel(
        cfg,
        options,
        transformer_config,
        pre_process=mpu.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=mpu.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
