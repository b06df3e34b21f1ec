"""Fixtures shared by the rollout unit tests (the real tokenizer and vision spec of the tiny checkpoint)."""
import pytest


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.fixture(scope="module")
def vision(tiny_hf_dir):
    from megatron_minio3.rollout.tokens import load_vision_spec

    return load_vision_spec(tiny_hf_dir)
