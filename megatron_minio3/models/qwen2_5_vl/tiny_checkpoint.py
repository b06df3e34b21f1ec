"""Write a complete, offline Qwen2.5-VL HF checkpoint with random weights (for tests and the CPU demo).

The directory looks like a released checkpoint: a flat ``config.json`` in the released layout
(``rope_scaling`` with ``mrope_section``, a nested ``vision_config``), ``model.safetensors`` with the
released tensor names (``model.layers.*``, ``visual.*``, ``lm_head.weight`` unless tied), a byte-level BPE
tokenizer with every Qwen2.5-VL special token, a chat template with Qwen2.5-VL's structure, and image and
video processor configs. Same arguments, same bytes.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Qwen2.5-VL's special tokens, in the released order (ids follow the BPE vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The same message layout as Qwen2.5-VL's template: default system turn, <|im_start|>role\n ... <|im_end|>\n,
# images and videos as <|vision_start|><pad><|vision_end|>, optional "Picture N: " ids, generation prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE merges are learned from: the words a visual-search policy reads and writes.
_MERGE_CORPUS = """
You are a helpful assistant. <think> Let me look at the image carefully. The object is small, so I will zoom in
on the region near the top left corner of the original image. </think> <grounding>{"bbox_2d": [0.12, 0.30, 0.45,
0.62], "source": "original_image"}</grounding> After the above Action 0, here is the the zoom-in image
(Observation 1): Continue your reasoning process inside <think> and </think>. If needed, you can continue to zoom
in on the original image or any of the observations, by outputting <grounding> and </grounding> as before. If the
final answer is confirmed, put your final answer inside <answer> and </answer>. ERROR occurs during grounding.
Error Information: the box is outside the image. Please analyse the error and continue. <answer>(B)</answer>
Question: What is the color of the small sign on the building? Options: (A) red (B) blue (C) green (D) yellow.
What is the number written on the license plate of the white car? How many people are standing near the door?
Which direction does the arrow point: left, right, up or down? The answer is 42. observation_1 observation_2
red green blue yellow black white orange purple circle square triangle star left right top bottom center middle
first second third image picture photo region crop zoom target object text letter digit number count the a an
of in on at to for with and or is are was were this that these those it its there here what which where how
0 1 2 3 4 5 6 7 8 9 10 100 0.0 0.25 0.5 0.75 1.0 {"bbox_2d": [ ], "source": } , . : ; ? ! ( ) [ ] { } " '
"""


@dataclass(frozen=True)
class TinyArch:
    """Architecture knobs of a generated checkpoint (flags of tools/make_tiny_checkpoint.py)."""

    num_layers: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_merges: int = 256
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_num_heads: int = 2
    vision_intermediate_size: int = 256
    vision_window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (1,)
    out_hidden_size: int | None = None  # defaults to hidden_size
    max_position_embeddings: int = 32768
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    extra: dict = field(default_factory=dict)


SIZES: dict[str, TinyArch] = {
    "tiny": TinyArch(),
    "small": TinyArch(
        num_layers=6,
        hidden_size=512,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1408,
        mrope_section=(8, 12, 12),
        num_merges=1024,
        vision_depth=4,
        vision_hidden_size=256,
        vision_num_heads=4,
        vision_intermediate_size=512,
        fullatt_block_indexes=(1, 3),
    ),
}


def validate_arch(arch: TinyArch) -> None:
    """Raises ValueError naming the knob that cannot form a valid Qwen2.5-VL model."""
    if arch.hidden_size % arch.num_heads:
        raise ValueError(f"hidden_size {arch.hidden_size} is not divisible by num_heads {arch.num_heads}")
    if arch.num_heads % arch.num_kv_heads:
        raise ValueError(f"num_heads {arch.num_heads} is not divisible by num_kv_heads {arch.num_kv_heads}")
    head_dim = arch.hidden_size // arch.num_heads
    if len(arch.mrope_section) != 3 or sum(arch.mrope_section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section {list(arch.mrope_section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}"
        )
    if arch.vision_hidden_size % arch.vision_num_heads:
        raise ValueError(
            f"vision_hidden_size {arch.vision_hidden_size} is not divisible by vision_num_heads {arch.vision_num_heads}"
        )
    bad = [i for i in arch.fullatt_block_indexes if not 0 <= i < arch.vision_depth]
    if bad:
        raise ValueError(f"fullatt_block_indexes {bad} are outside vision_depth {arch.vision_depth}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    counts = collections.Counter(words)
    split = {word: list(word) for word in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: collections.Counter = collections.Counter()
        for word, freq in counts.items():
            symbols = split[word]
            for a, b in zip(symbols, symbols[1:]):
                pair_counts[(a, b)] += freq
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < 2:
            break
        merges.append(best)
        for word, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[word] = out
    return merges


def build_tokenizer(num_merges: int):
    """A byte-level BPE `tokenizers.Tokenizer` with the Qwen2.5-VL special tokens appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_MERGE_CORPUS)]
    merges = learn_bpe_merges(words, num_merges)
    vocab = {byte_chars[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def hf_config_dict(arch: TinyArch, vocab_size: int, token_ids: dict[str, int]) -> dict:
    """config.json in the layout of the released Qwen2.5-VL checkpoints."""
    out_hidden = arch.out_hidden_size or arch.hidden_size
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "max_window_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_kv_heads,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(arch.mrope_section)},
        "sliding_window": arch.max_position_embeddings,
        "use_sliding_window": False,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": arch.vision_depth,
            "hidden_act": "silu",
            "hidden_size": arch.vision_hidden_size,
            "intermediate_size": arch.vision_intermediate_size,
            "num_heads": arch.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": out_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": arch.vision_window_size,
            "fullatt_block_indexes": list(arch.fullatt_block_indexes),
            "initializer_range": 0.02,
        },
        **arch.extra,
    }


def released_tensor_name(name: str) -> str:
    """Map a transformers-v5 state-dict name to the name used in released Qwen2.5-VL safetensors."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def make_tiny_checkpoint(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, **arch_overrides) -> Path:
    """Write the checkpoint to ``out_dir`` (atomically: a temporary sibling is renamed when complete)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    unknown = set(arch_overrides) - set(TinyArch.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown architecture knobs {sorted(unknown)}; valid: {sorted(TinyArch.__dataclass_fields__)}")
    for key in ("mrope_section", "fullatt_block_indexes"):
        if key in arch_overrides:
            arch_overrides[key] = tuple(arch_overrides[key])
    arch = replace(SIZES[size], **arch_overrides)
    validate_arch(arch)

    import torch  # heavy imports only once the arguments are known to be good

    from megatron_minio3.convert.safetensors_io import atomic_directory
    from safetensors.torch import save_file
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp_dir:
        bpe = build_tokenizer(arch.num_merges)
        token_ids = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
        vocab_size = _round_up(bpe.get_vocab_size(), 128)
        config_dict = hf_config_dict(arch, vocab_size, token_ids)
        (tmp_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        (tmp_dir / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": token_ids["<|endoftext|>"],
                    "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
                    "pad_token_id": token_ids["<|endoftext|>"],
                    "do_sample": False,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )

        config = Qwen2_5_VLConfig.from_pretrained(tmp_dir)
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
        state = {}
        for name, tensor in model.state_dict().items():
            if arch.tie_word_embeddings and name == "lm_head.weight":
                continue
            state[released_tensor_name(name)] = tensor.detach().contiguous().clone()
        save_file(dict(sorted(state.items())), str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})

        tokenizer = Qwen2TokenizerFast(
            tokenizer_object=bpe,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            errors="replace",
            model_max_length=arch.max_position_embeddings,
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
        image_processor = Qwen2VLImageProcessor(min_pixels=arch.image_min_pixels, max_pixels=arch.image_max_pixels)
        video_processor = Qwen2VLVideoProcessor()
        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=CHAT_TEMPLATE,
        )
        processor.save_pretrained(tmp_dir)
        (tmp_dir / "tiny_checkpoint.json").write_text(
            json.dumps({"size": size, "seed": seed, "arch": asdict(arch)}, indent=2, sort_keys=True, default=list)
            + "\n"
        )
    return out_dir
