"""Our Qwen2.5-VL vision encoder equals transformers' (outputs and gradients), for several architectures."""
from __future__ import annotations

import pytest
import torch

from megatron_minio3.convert.qwen2_5_vl import TRANSFORMERS5, megatron_to_hf, parameter_rule
from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config
from megatron_minio3.models.qwen2_5_vl.vision import VisionEncoder, vision_layout

ARCHITECTURES = {
    # window 56 px = 2 merge blocks per window side; one full-attention block in the middle
    "window56": dict(depth=3, hidden_size=64, num_heads=2, intermediate_size=96, window_size=56,
                     fullatt_block_indexes=[1]),
    # the released window (112 px = 4 blocks), full attention first and last, 4 heads
    "window112": dict(depth=3, hidden_size=128, num_heads=4, intermediate_size=80, window_size=112,
                      fullatt_block_indexes=[0, 2]),
}
# Images whose merged grids are not multiples of the window, plus a 2-frame grid.
GRIDS = torch.tensor([[1, 6, 10], [1, 12, 4], [2, 4, 4], [1, 2, 2], [1, 18, 14]])


def make_pair(arch: dict, seed: int):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=64,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 8, 8]}),
        vision_config=dict(out_hidden_size=96, **arch),
    )
    torch.manual_seed(seed)
    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config.vision_config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in hf.named_parameters():  # unit-scale weights: peaked attention, O(1) activations
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn_like(param) / fan_in**0.5 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    cfg = parse_hf_config(hf_config.to_dict())
    ours = VisionEncoder(cfg.vision)
    state = {}
    for name, _ in ours.named_parameters():
        rule = parameter_rule(f"vision_model.{name}", cfg, TRANSFORMERS5)
        hf_name = rule.hf_names[0].removeprefix(TRANSFORMERS5.vision_prefix)
        state[name] = rule.layout.from_parts([hf.state_dict()[hf_name]])
    ours.load_state_dict(state)
    # the rules map back to exactly the HF tensors
    for name, param in ours.named_parameters():
        [(hf_name, tensor)] = megatron_to_hf(f"vision_model.{name}", param.detach(), cfg, TRANSFORMERS5)
        assert torch.equal(tensor, hf.state_dict()[hf_name.removeprefix(TRANSFORMERS5.vision_prefix)])
    return hf, ours, cfg


@pytest.mark.parametrize("arch_name", sorted(ARCHITECTURES))
def test_outputs_and_gradients_match_transformers(arch_name):
    hf, ours, cfg = make_pair(ARCHITECTURES[arch_name], seed=3)
    pixel_values = torch.randn(int(GRIDS.prod(-1).sum()), cfg.vision.patch_input_size)
    hf_out = hf(pixel_values, grid_thw=GRIDS).pooler_output
    out = ours(pixel_values, GRIDS)
    assert out.shape == (int(GRIDS.prod(-1).sum()) // 4, 96)
    scale = float(hf_out.detach().abs().max())
    assert scale > 1.0
    assert float((out - hf_out).detach().abs().max()) <= 1e-5 * scale

    probe = torch.randn_like(out)
    (hf_out * probe).sum().backward()
    (out * probe).sum().backward()
    hf_grads = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        rule = parameter_rule(f"vision_model.{name}", cfg, TRANSFORMERS5)
        hf_grad = hf_grads[rule.hf_names[0].removeprefix(TRANSFORMERS5.vision_prefix)].grad
        expected = rule.layout.from_parts([hf_grad])
        assert float((param.grad - expected).abs().max()) <= 1e-4 * max(1.0, float(expected.abs().max())), name


def test_window_layout_groups_merge_blocks_window_by_window():
    cfg = parse_hf_config(_minimal_hf_config_dict(window_size=56))
    layout = vision_layout(torch.tensor([[1, 6, 10]]), cfg.vision)  # merged grid 3 x 5, windows of 2 x 2 blocks
    assert layout.window_order_M.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert layout.window_lengths == (16, 16, 8, 8, 8, 4)  # patches: 4 per merge block
    assert layout.frame_lengths == (60,)


def _minimal_hf_config_dict(window_size: int) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "vocab_size": 64, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                          "out_hidden_size": 64, "window_size": window_size},
    }


def test_shape_mismatch_is_a_value_error():
    cfg = parse_hf_config(_minimal_hf_config_dict(112))
    encoder = VisionEncoder(cfg.vision)
    with pytest.raises(ValueError, match=r"pixel_values shape \(10, 1176\) does not match image_grid_thw"):
        encoder(torch.zeros(10, 1176), torch.tensor([[1, 4, 4]]))
