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
    # the seed's loss scale (verl token-mean over one-sequence micro-batches) and rejection sampling
    assert (cfg.algorithm.loss_agg_mode, cfg.algorithm.seq_mean_denominator) == ("seq-mean-token-mean", "all")
    assert cfg.algorithm.dynamic_sampling and cfg.trainer.prompts_per_round == 256


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
    (["parallel.cp=0"], "parallel.cp must be >= 1"),
    (["ref.enabled=true"], "ref.enabled=true but algorithm.kl_coef is 0"),
    (["ref.enabled=false", "algorithm.kl_coef=0.01"], "algorithm.kl_coef=0.01 needs the reference model"),
    (["actor.optim.min_lr=1e-7"], "actor.optim.min_lr .* only applies to actor.optim.lr_schedule=cosine"),
    (["actor.freeze_vision_tower=true", "actor.freeze_merger=true", "actor.freeze_language_model=true"],
     "nothing would be trained"),
    (["trainer.num_rollout_workers=2"], "trainer.num_rollout_workers applies to trainer.rollout_placement=separate"),
    (["weights.probe_num_prompts=0"], "weights.probe_num_prompts must be >= 1 when weights.probe_every > 0"),
    (["algorithm.dynamic_sampling=false", "trainer.max_generation_rounds=8"],
     "trainer.max_generation_rounds applies to dynamic sampling"),
    (["algorithm.dynamic_sampling=false", "trainer.prompts_per_round_multiplier=2"],
     "trainer.prompts_per_round_multiplier applies to dynamic sampling"),
    (["algorithm.dynamic_sampling=false", "trainer.overlap_rounds=true"],
     "trainer.overlap_rounds applies to dynamic sampling"),
    (["trainer.overlap_rounds_at=0"], r"trainer.overlap_rounds_at is the share .* in \(0, 1\]; got 0.0"),
    (["trainer.overlap_rounds_at=1.5"], r"trainer.overlap_rounds_at is the share .* got 1.5"),
])
def test_keys_that_would_be_ignored_are_refused(overrides, message):
    """A key is either acted on or refused where it cannot apply; never accepted and ignored."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_generation_rounds_and_prompts_per_round():
    cfg = load_config(None, ["trainer.train_batch_size=256", "actor.ppo_mini_batch_size=32",
                             "trainer.prompts_per_round_multiplier=1.5"])
    assert cfg.trainer.prompts_per_round == 384 and cfg.trainer.max_generation_rounds == 16
    assert load_config(None, ["trainer.train_batch_size=3", "actor.ppo_mini_batch_size=1",
                              "trainer.prompts_per_round_multiplier=0.5"]).trainer.prompts_per_round == 1  # int()
    with pytest.raises(ConfigError, match="prompts_per_round_multiplier must make at least one prompt"):
        load_config(None, ["trainer.train_batch_size=2", "actor.ppo_mini_batch_size=1",
                           "trainer.prompts_per_round_multiplier=0.25"])
    with pytest.raises(ConfigError, match="algorithm.seq_mean_denominator' expects one of 'with_loss_tokens', 'all'"):
        load_config(None, ["algorithm.seq_mean_denominator=trained"])
    assert load_config(None, ["algorithm.seq_mean_denominator=all"]).algorithm.seq_mean_denominator == "all"


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


# ---------------------------------------------------------------- hostile files and values (issue 15)


def test_a_defaults_cycle_names_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\nrollout:\n  n: 4\n")
    (tmp_path / "b.yaml").write_text("defaults: c.yaml\n")
    (tmp_path / "c.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'defaults' cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("defaults: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml -> .*self\.yaml"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_defaults_file_names_the_file_that_asks_for_it(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml does not exist \(named by 'defaults' in .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("text, message", [
    ("rollout:\n  n: 4\n   temperature: [1\n", r"bad\.yaml, line 3, column 15: .*mapping values are not allowed"),
    ("rollout: [1, 2\n", r"bad\.yaml, line 2, column 1: .*expected ',' or ']'"),
    ("rollout:\n\tn: 4\n", r"bad\.yaml, line 2, column 1: .*found character '\\t' that cannot start any token"),
    ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", r"bad\.yaml: nested too deeply"),
])
def test_a_yaml_syntax_error_names_the_file_and_line_in_one_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "child.yaml").write_text("defaults: bad.yaml\n")
    for name in ("bad.yaml", "child.yaml"):  # also when it is reached through `defaults:`
        with pytest.raises(ConfigError, match=message) as info:
            load_config(tmp_path / name)
        assert "\n" not in str(info.value) and "<unicode string>" not in str(info.value)


def test_unreadable_config_files_name_the_file(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("trainer:\n  experiment_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9 at offset 31\)"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r"config file .* is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("override, key", [
    ("rollout.temperature=nan", "rollout.temperature"),
    ("actor.optim.lr=nan", "actor.optim.lr"),
    ("actor.optim.lr=.nan", "actor.optim.lr"),
    ("actor.optim.lr=inf", "actor.optim.lr"),
    ("actor.optim.lr=-.inf", "actor.optim.lr"),
    ("algorithm.clip_ratio_high=1e999", "algorithm.clip_ratio_high"),
    ("rollout.top_p=Infinity", "rollout.top_p"),
])
def test_non_finite_numbers_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number, got (nan|inf|-inf)"):
        load_config(None, [override])


def test_a_deeply_nested_override_is_a_type_error_not_a_crash():
    with pytest.raises(ConfigError, match=r"'data.val_files' expects list, got '\[\[\[.{180,200}\.\.\. \(str\)"):
        load_config(None, ["data.val_files=" + "[" * 20_000 + "]" * 20_000])


def _float_keys(cls, prefix=""):
    """Every float field of the config tree (plain or optional), wherever it sits."""
    import dataclasses
    import types
    import typing

    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{name}.")
        elif tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
            keys.append(f"{prefix}{name}")
    return keys


def test_non_finite_numbers_anywhere_in_a_file_are_refused(tmp_path):
    from megatron_minio3.config.loader import _all_keys
    from megatron_minio3.config.schema import Config

    float_keys = _float_keys(Config)
    assert len(float_keys) > 10 and set(float_keys) <= set(_all_keys(Config))
    for key in float_keys:
        *sections, leaf = key.split(".")
        text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: .nan\n"
        (tmp_path / "nan.yaml").write_text(text)
        with pytest.raises(ConfigError, match=rf"nan\.yaml: '{key}' must be a finite number, got nan"):
            load_config(tmp_path / "nan.yaml")


def test_trainer_cli_answers_config_mistakes_with_one_line_and_exit_code_2(tmp_path, capsys):
    from megatron_minio3.trainer import grpo

    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    (tmp_path / "bad.yaml").write_text("rollout: [1, 2\n")
    for argv in (["--config", str(tmp_path / "a.yaml")], ["--config", str(tmp_path / "bad.yaml")],
                 ["rollout.temperature=nan"], ["--dry-run", "actor.optim.lr=nan"]):
        capsys.readouterr()
        assert grpo.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_stages_schedule_the_group_size_and_turn_limit():
    """trainer.stages (Vision-R1's PTST): each stage from its step on; 0 keeps the rollout section's value."""
    cfg = load_config(None, ["trainer.stages=[{from_step: 3, max_tokens_per_turn: 4096}, {from_step: 5, n: 8}, "
                             "{from_step: 9, n: 4, max_tokens_per_turn: 16384}]", "rollout.n=16",
                             "rollout.max_tokens_per_turn=2048", "trainer.train_batch_size=8",
                             "actor.ppo_mini_batch_size=8"])
    at = lambda step: cfg.trainer.stage_at(step, cfg.rollout.n, cfg.rollout.max_tokens_per_turn)  # noqa: E731
    assert [(at(s).index, at(s).n, at(s).max_tokens_per_turn) for s in (1, 2, 3, 4, 5, 8, 9, 100)] == [
        (0, 16, 2048), (0, 16, 2048), (1, 16, 4096), (1, 16, 4096), (2, 8, 2048), (2, 8, 2048), (3, 4, 16384),
        (3, 4, 16384)]
    for bad, message in (
        ("[{from_step: 4}, {from_step: 4}]", "from_step must increase"),
        ("[{from_step: 0, n: 2}]", r"trainer.stages\[0\]: from_step must be >= 1"),
        ("[{from_step: 2, n: -1}]", r"trainer.stages\[0\]"),
        ("[{from_step: 2, max_tokens_per_turn: 40000}]", "must be below rollout.max_total_tokens"),
        ("[{from_step: 2, turns: 3}]", "trainer.stages"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"trainer.stages={bad}"])
