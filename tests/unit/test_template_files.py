"""Templates from files (data.template_files): a user-supplied template set reproduces a given token sequence
exactly, through the same TurnTokenizer the rollout and SFT use."""
from __future__ import annotations

import pytest
import yaml

from megatron_minio3.config import ConfigError, dump_yaml, load_config
from megatron_minio3.rollout.tokens import TurnTokenizer

# A released checkpoint's wording (made up here, in the style of the seed's prompts), as a user would save it
SYSTEM = "You are a helpful assistant.\nYou can crop the image with the grounding tool."
USER = "{question}\nThink first, then call the tool or answer."
OBSERVATION = "Here is the crop of Action {action} (Observation {observation}):\n<image>\n"  # ends with a newline
ERROR = "The call failed: {error}. Try again."

# The token sequence that checkpoint was trained on, written out as text (Qwen2.5-VL's chat layout)
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.\nYou can crop the image with the grounding tool.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat colour is the square?\n"
    "Think first, then call the tool or answer.<|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED_OBSERVATION = (
    "<|im_end|>\n<|im_start|>user\nHere is the crop of Action 0 (Observation 1):\n"
    "<|vision_start|><|image_pad|><|vision_end|>\n<|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED_ERROR = "<|im_end|>\n<|im_start|>user\nThe call failed: bad box. Try again.<|im_end|>\n<|im_start|>assistant\n"


def write_template_set(folder):
    folder.mkdir()
    for name, text in (("system.txt", SYSTEM), ("user.txt", USER), ("observation.txt", OBSERVATION),
                       ("error.txt", ERROR)):
        (folder / name).write_text(text + "\n")  # as an editor saves it: one final newline, not part of the text
    return {"system_prompt": str(folder / "system.txt"), "user_template": str(folder / "user.txt"),
            "observation_template": str(folder / "observation.txt"), "error_template": str(folder / "error.txt")}


def test_a_template_set_from_files_reproduces_the_given_token_sequence(tmp_path, tokenizer):
    files = write_template_set(tmp_path / "templates")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"template_files": files}}))
    cfg = load_config(config)
    assert (cfg.data.system_prompt, cfg.data.user_template, cfg.data.observation_template,
            cfg.data.error_template) == (SYSTEM, USER, OBSERVATION, ERROR)
    assert cfg.data.template_files == {}  # read into the templates: the loaded config holds the text
    turns = TurnTokenizer(tokenizer, cfg.data)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert turns.prompt_ids("<image>\nWhat colour is the square?", 1) == encode(EXPECTED_PROMPT)
    assert turns.observation_ids(action=0, observation=1) == encode(EXPECTED_OBSERVATION)
    # the error turn: the same text; the message is tokenized on its own, as plain text (it may quote the model)
    error = turns.error_ids("bad box")
    assert tokenizer.decode(error) == EXPECTED_ERROR
    prefix, suffix = encode("<|im_end|>\n<|im_start|>user\nThe call failed: "), encode(". Try again.<|im_end|>\n"
                                                                                     "<|im_start|>assistant\n")
    assert error == prefix + encode("bad box") + suffix
    # the same set given inline, and the config.yaml a checkpoint keeps, load to the same templates
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump({"data": {"system_prompt": SYSTEM, "user_template": USER,
                                               "observation_template": OBSERVATION, "error_template": ERROR}}))
    dump_yaml(cfg, tmp_path / "saved.yaml")
    assert load_config(inline).data == cfg.data == load_config(tmp_path / "saved.yaml").data


def test_template_file_mistakes_name_the_key_and_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"template_files": {"user_prompt": "u.txt"}}}))
    with pytest.raises(ConfigError, match="data.template_files: unknown template 'user_prompt'; choose from "):
        load_config(config)
    config.write_text(yaml.safe_dump({"data": {"template_files": {"user_template": str(tmp_path / "missing.txt")}}}))
    with pytest.raises(ConfigError, match=f"data.template_files.user_template: cannot read {tmp_path / 'missing.txt'}"):
        load_config(config)
    (tmp_path / "obs.txt").write_text("Observation {observation} without its image\n")
    with pytest.raises(ConfigError, match="data.observation_template: must contain <image> exactly once"):
        load_config(None, [f"data.template_files={{observation_template: {tmp_path / 'obs.txt'}}}"])
