"""Typed config: YAML files, dotted overrides, errors that name the key, the file and the nearest valid key."""
from pathlib import Path

import pytest

from megatron_minio3.config import ConfigError, dump_yaml, load_config, parse_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.trainer.train_batch_size % cfg.actor.ppo_mini_batch_size == 0


def test_recipe_values_in_the_7b_config():
    cfg = load_config(CONFIGS / "qwen2_5_vl_7b_grpo.yaml")
    assert (cfg.rollout.n, cfg.trainer.train_batch_size, cfg.actor.ppo_mini_batch_size) == (16, 256, 32)
    assert cfg.actor.optim.lr == 1e-6 and cfg.actor.optim.lr_schedule == "constant"
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high) == (0.2, 0.3)
    assert cfg.algorithm.kl_coef == 0 and not cfg.use_reference_model
    assert (cfg.rollout.max_turns, cfg.eval.max_turns, cfg.rollout.max_images) == (6, 12, 12)


def test_defaults_inherit_and_overrides_win():
    cfg = load_config(CONFIGS / "qwen2_5_vl_32b_grpo.yaml", ["rollout.n=8", "parallel.pp=4"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (8, 4)  # tp from the file, pp from the command line
    assert cfg.rollout.n == 8 and cfg.rollout.max_turns == 6  # max_turns inherited from the 7B file


def test_override_value_types():
    cfg = load_config(None, [
        "actor.optim.lr=1e-5",              # YAML 1.1 reads this as a string; a float field accepts it
        "data.val_files=[a.json, b.json]",
        "reward.verifiers={vstar: mc, visualprobe: judge}",
        "rollout.stop=[</grounding>]",
        "actor.freeze_vision_tower=true",
        "model=/ckpt/minio3-7b",
    ])
    assert cfg.actor.optim.lr == 1e-5 and isinstance(cfg.actor.optim.lr, float)
    assert cfg.data.val_files == ["a.json", "b.json"]
    assert cfg.reward.verifiers == {"vstar": "mc", "visualprobe": "judge"}
    assert cfg.rollout.stop == ["</grounding>"]
    assert cfg.actor.freeze_vision_tower is True and cfg.model == "/ckpt/minio3-7b"


@pytest.mark.parametrize("override,message", [
    ("rollout.nn=3", r"unknown config key 'rollout.nn'; did you mean 'rollout.n'\?"),
    ("actr.optim.lr=1", r"unknown config key 'actr.optim.lr'; did you mean 'actor.optim.lr'\?"),
    ("actor.optim.lr=fast", r"'actor.optim.lr' expects float, got 'fast'"),
    ("rollout.n=2.5", r"'rollout.n' expects int, got 2.5"),
    ("rollout.n=true", r"'rollout.n' expects int, got True"),
    ("actor.freeze_vision_tower=3", r"'actor.freeze_vision_tower' expects bool"),
    ("algorithm.loss_agg_mode=mean", r"'algorithm.loss_agg_mode' expects one of 'token-mean'"),
    ("data.val_files=a.json", r"'data.val_files' expects list"),
    ("actor.optim=3", r"'actor.optim' expects OptimConfig"),
    ("rollout.n", r"not of the form section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_errors_in_a_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  n: 4\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml: unknown config key 'rollout.temprature'; "
                                          r"did you mean 'rollout.temperature'\?"):
        load_config(bad)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("trainer:\n  total_steps: many\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: 'trainer.total_steps' expects int, got 'many'"):
        load_config(wrong_type)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_value_checks_across_sections():
    with pytest.raises(ConfigError, match=r"train_batch_size \(10\) must be a multiple of actor.ppo_mini_batch_size \(4\)"):
        load_config(None, ["trainer.train_batch_size=10", "actor.ppo_mini_batch_size=4"])
    with pytest.raises(ConfigError, match="parallel.tp must be >= 1"):
        load_config(None, ["parallel.tp=0"])


@pytest.mark.parametrize("overrides,message", [
    (["parallel.backend=gloo"], "unknown config key 'parallel.backend'"),  # chosen from the device, not a key
    (["parallel.cp=2"], "parallel.cp must be 1: context parallelism is not implemented yet"),
    (["ref.enabled=true"], "ref.enabled=true but algorithm.kl_coef is 0"),
    (["ref.enabled=false", "algorithm.kl_coef=0.01"], "algorithm.kl_coef=0.01 needs the reference model"),
    (["actor.optim.min_lr=1e-7"], "actor.optim.min_lr .* only applies to actor.optim.lr_schedule=cosine"),
    (["actor.freeze_vision_tower=true", "actor.freeze_merger=true", "actor.freeze_language_model=true"],
     "nothing would be trained"),
    (["trainer.num_rollout_workers=2"], "trainer.num_rollout_workers applies to trainer.rollout_placement=separate"),
    (["weights.probe_num_prompts=0"], "weights.probe_num_prompts must be >= 1 when weights.probe_every > 0"),
])
def test_keys_that_would_be_ignored_are_refused(overrides, message):
    """A key is either acted on or refused where it cannot apply; never accepted and ignored."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_booleans_select_literal_options(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text("ref:\n  enabled: true\nalgorithm:\n  kl_coef: 0.01\n")  # unquoted, as people write it
    cfg = load_config(path)
    assert cfg.ref.enabled == "true" and cfg.use_reference_model
    assert load_config(None, ["weights.probe_every=0", "weights.probe_num_prompts=0"]).weights.probe_num_prompts == 0


def test_parse_cli_and_dump_round_trip(tmp_path):
    cfg = parse_cli(["--config", str(CONFIGS / "tiny_cpu.yaml"), "rollout.n=3", "model=/m"])
    assert cfg.rollout.n == 3 and cfg.model == "/m"
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError, match="unknown option '--lr'"):
        parse_cli(["--lr", "3"])
