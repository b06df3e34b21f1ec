"""prelaunch(cfg, entry): the resource checks of every entry point (trainer/prelaunch.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from megatron_minio3.config import load_config
from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.trainer.prelaunch import prelaunch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_visual_search_dataset(tmp_path_factory.mktemp("data"), 3, seed=0,
                                       spec=VisualSearchSpec(width=112, height=112, num_distractors=1))


def test_each_entry_reads_what_it_needs(tiny_hf_dir, data, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config(None, [f"model={tiny_hf_dir}", f"data.train_files=[{data}]", f"data.val_files=[{data}]",
                             "reward.verifiers={synthetic_visual_search: mc}", "reward.default_verifier=''"])
    grpo = prelaunch(cfg, "grpo")
    assert len(grpo.train_prompts) == 3 and grpo.val_prompts == [] and grpo.tokenizer is not None
    evaluation = prelaunch(cfg, "eval")
    assert len(evaluation.val_prompts) == 3 and evaluation.train_prompts == []
    # the reward server needs no model, and the judge's key only when a source scores with the judge
    server = load_config(None, ["reward.verifiers={synthetic_visual_search: mc}", "reward.default_verifier=''"])
    assert prelaunch(server, "reward_server").tokenizer is None
    judged = load_config(None, ["reward.verifiers={synthetic_visual_search: judge}", "reward.default_verifier=''"])
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        prelaunch(judged, "reward_server")
    with pytest.raises(ValueError, match="unknown entry point 'train'"):
        prelaunch(cfg, "train")


def test_a_checkpoint_without_its_tokenizer_stops_every_model_entry(tiny_hf_dir, data, tmp_path):
    model = tmp_path / "weights_only"
    model.mkdir()
    for name in ("config.json", *(p.name for p in tiny_hf_dir.glob("*.safetensors*"))):
        shutil.copy(tiny_hf_dir / name, model / name)
    cfg = load_config(None, [f"model={model}", f"data.train_files=[{data}]", f"data.val_files=[{data}]",
                             f"sft.train_files=[{data}]", "reward.verifiers={synthetic_visual_search: mc}",
                             "reward.default_verifier=''"])
    for entry in ("grpo", "sft", "eval"):
        with pytest.raises(ValueError, match=rf"model: cannot load the tokenizer of {model}|tokenizer has no"):
            prelaunch(cfg, entry)
    assert prelaunch(cfg, "grpo", tokenizer=False).train_prompts  # a dry run plans from config.json alone
    (model / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        prelaunch(cfg, "eval")


def test_missing_files_are_named(tiny_hf_dir, data, tmp_path):
    cfg = load_config(None, [f"model={tiny_hf_dir}", f"sft.train_files=[{tmp_path / 'none.json'}]",
                             "trainer.eval_before_train=true", f"data.train_files=[{data}]"])
    with pytest.raises(ValueError, match="sft.train_files: .*none.json is not a file"):
        prelaunch(cfg, "sft")
    with pytest.raises(ValueError, match="trainer.eval_before_train is set but data.val_files is empty"):
        prelaunch(cfg, "grpo")
    rows = json.loads(data.read_text())
    rows[1]["images"] = ["gone.png"]
    broken = tmp_path / "train.json"
    broken.write_text(json.dumps(rows))
    cfg = load_config(None, [f"model={tiny_hf_dir}", f"data.train_files=[{broken}]", f"data.image_dir={data.parent}"])
    with pytest.raises(ValueError, match=rf"{broken} row 1: image 'gone.png' not found"):
        prelaunch(cfg, "grpo")
