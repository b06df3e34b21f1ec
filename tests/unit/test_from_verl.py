"""tools/from_verl.py: the seed's `python3 -m verl.trainer.main_ppo ...` command -> our YAML config. Every flag of the
recipe's command is mapped, implied or listed unmapped with a reason; the YAML passes the trainer's pre-launch checks
(`--dry-run`) with a stand-in 7B checkpoint and stand-in data in the seed's file layout; the shell reading (quotes,
continuations, variables) and the errors (malformed arguments, unset variables) are exact."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_minio3.config import load_config
from megatron_minio3.config.from_verl import (
    G_UNKNOWN,
    IMPLIED,
    MAPPED,
    UNMAPPED,
    TranslationError,
    main,
    markdown_table,
    parse_flags,
    parse_value,
    read_command,
    translate,
    write_yaml,
)
from megatron_minio3.config.shell_words import ShellSyntaxError, fenced_blocks, parse_script
from tests.unit.test_launch_plan import QWEN2_5_VL_7B_INSTRUCT

REPO = Path(__file__).resolve().parents[2]
RECIPE_DOC = REPO.parent / "shared" / "docs" / "minio3_recipe.md"
EMBEDDED = REPO / "tests" / "data" / "minio3_seed_command.sh"
DOCS_TABLE = REPO / "docs" / "from_verl.md"


def seed_command() -> str:
    """The appendix's fenced block of the recipe doc when it is there (../shared), else the embedded copy."""
    if RECIPE_DOC.is_file():
        blocks = fenced_blocks(RECIPE_DOC.read_text(encoding="utf-8"))
        return next(b for b in blocks if "verl.trainer.main_ppo" in b)
    return EMBEDDED.read_text(encoding="utf-8")


def seed_args(base_image_dir: str = "/data") -> list[str]:
    args, _ = read_command(seed_command(), {}, {"BASE_IMAGE_DIR": base_image_dir})
    return args


def outcome_of(translation, key: str):
    found = [o for o in translation.outcomes if o.arg.split("=", 1)[0] == key]
    assert len(found) == 1, key
    return found[0]


def test_the_embedded_copy_matches_the_recipe_doc():
    if not RECIPE_DOC.is_file():
        pytest.skip("../shared/docs/minio3_recipe.md is not next to this checkout")
    embedded = "".join(line for line in EMBEDDED.read_text().splitlines(keepends=True) if not line.startswith("#"))
    assert embedded == seed_command()


@pytest.fixture(scope="module")
def seed():
    args, found = read_command(seed_command(), {}, {"BASE_IMAGE_DIR": "/data"})
    return translate(args, environment=found["environment"], data_defaults=found["defaults"], train_size=8000)


def test_every_flag_of_the_seed_command_is_accounted_for(seed):
    args = seed_args()
    assert len(args) == 78
    assert [o.arg for o in seed.outcomes] == args  # one outcome per argument, in order: none dropped
    for outcome in seed.outcomes:
        assert outcome.status in (MAPPED, IMPLIED, UNMAPPED)
        if outcome.status == MAPPED:
            assert outcome.settings, outcome.arg
        else:
            assert outcome.reason and not outcome.settings, outcome.arg
        if outcome.status == UNMAPPED:
            assert outcome.group and outcome.group != G_UNKNOWN, outcome.arg  # every seed flag has a rule
    counts = {s: seed.count(s) for s in (MAPPED, IMPLIED, UNMAPPED)}
    assert sum(counts.values()) == 78 and counts[UNMAPPED] >= 10
    unmapped = {o.arg.split("=", 1)[0] for o in seed.outcomes if o.status == UNMAPPED}
    assert {"actor_rollout_ref.actor.fsdp_config.param_offload", "actor_rollout_ref.rollout.max_num_batched_tokens",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", "algorithm.kl_ctrl.kl_coef",
            "trainer.train_generations_to_log_to_wandb", "data.system_prompt"} <= unmapped


def test_the_seed_values(seed, tmp_path):
    cfg = write_yaml(seed, tmp_path / "minio3.yaml", "test")
    assert cfg == load_config(tmp_path / "minio3.yaml")
    assert cfg.actor.optim.lr == 1e-6 and cfg.actor.optim.lr_schedule == "constant"
    assert (cfg.rollout.n, cfg.rollout.max_turns, cfg.eval.max_turns) == (16, 6, 12)
    assert (cfg.rollout.max_images, cfg.eval.max_images) == (12, 12)
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high) == (0.2, 0.3)
    assert cfg.algorithm.kl_coef == 0 and cfg.algorithm.kl_estimator == "k3" and not cfg.use_reference_model
    assert cfg.algorithm.entropy_coef == 0 and cfg.algorithm.ignore_exceed and cfg.algorithm.dynamic_sampling
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-mean"  # token-mean over micro-batches of one sequence
    assert cfg.trainer.loggers == ["console", "wandb"]
    assert (cfg.trainer.project, cfg.trainer.experiment) == ("Mini-o3", "Mini-o3-RL")
    assert (cfg.trainer.dump_rollouts_every, cfg.trainer.log_val_generations) == (5, 512)
    assert (cfg.trainer.save_every, cfg.trainer.eval_every, cfg.trainer.output_dir) == (25, 5, "./save")
    assert (cfg.trainer.train_batch_size, cfg.actor.ppo_mini_batch_size) == (256, 32)
    assert cfg.trainer.total_steps == 100 * (8000 // 256)  # epochs x batches of the dataloader (drop_last)
    assert (cfg.cluster.num_nodes, cfg.cluster.gpus_per_node) == (8, 8)
    assert (cfg.parallel.tp, cfg.parallel.dp) == (2, 32)  # every one of the 64 GPUs, as the seed's FSDP actor
    assert (cfg.rollout.tensor_parallel_size, cfg.rollout.gpu_memory_utilization) == (1, 0.6)
    assert cfg.rollout.max_tokens_per_turn == 8192 and cfg.rollout.relative_coordinates
    assert (cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.image_dir) == (40000, 2000000, "/data")
    assert cfg.data.train_files == ["/data/VisualProbe_train/train.json", "/data/DeepEyes_train_4K/train.json"]
    assert cfg.data.val_files == [f"/data/{name}/val.json" for name in
                                  ("Vstar_Bench", "VisualProbe_Easy", "VisualProbe_Medium", "VisualProbe_Hard")]
    assert cfg.reward.default_verifier == "judge" and cfg.reward.judge.max_concurrency == 300
    assert (cfg.reward.judge.provider, cfg.reward.judge.api_key_env) == ("azure", "API_KEY")  # the seed's Azure judge
    assert cfg.reward.judge.answer_extraction == "strict" and cfg.algorithm.seq_mean_denominator == "all"
    assert cfg.trainer.eval_before_train and cfg.trainer.prompts_per_round_multiplier == 1
    assert cfg.rollout.max_prompt_tokens == 8192
    assert (cfg.reward.accuracy_weight, cfg.reward.format_weight, cfg.reward.tool_call_penalty) == (1.0, 0.0, 0.0)
    assert cfg.model == "Mini-o3/Mini-o3-7B-SFT"


def test_the_yaml_holds_defaults_and_only_what_changed(seed, tmp_path):
    out = tmp_path / "sub" / "minio3.yaml"
    write_yaml(seed, out, "test")
    text = out.read_text()
    data = yaml.safe_load(text)
    assert (out.parent / data.pop("defaults")).resolve() == (REPO / "configs" / "qwen2_5_vl_7b_grpo.yaml").resolve()
    base = load_config(REPO / "configs" / "qwen2_5_vl_7b_grpo.yaml")
    assert "n" not in data.get("rollout", {})  # 16 in the base already: not repeated
    assert data["trainer"]["project"] == "Mini-o3" and base.trainer.project != "Mini-o3"
    assert "eval_every: 5  # trainer.test_freq=5" in text and "dp: 32  # derived" in text
    assert "#   algorithm.kl_ctrl.kl_coef=0.001" in text  # the unmapped flags travel with the file


@pytest.fixture()
def stand_ins(tmp_path, monkeypatch):
    """A stand-in 7B checkpoint directory (config.json only: the dry run reads nothing else) and the seed's data files
    under a BASE_IMAGE_DIR, in the Mini-o3 JSON format with tiny images."""
    from PIL import Image

    model = tmp_path / "Mini-o3-7B-SFT"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN2_5_VL_7B_INSTRUCT))
    base = tmp_path / "base_image_dir"
    (base / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(base / "images" / f"{i}.png")

    def rows(source: str, count: int) -> list[dict]:
        return [{"images": [f"images/{i % 3}.png"], "doc_id": str(i), "problem": "<image>\nWhat colour is the sign?",
                 "solution": "(B) blue", "data_source": source} for i in range(count)]

    layout = {"VisualProbe_train/train.json": ("visual_probe_train", 300),
              "DeepEyes_train_4K/train.json": ("deepeyes_train", 60),
              "Vstar_Bench/val.json": ("vstar_bench", 4), "VisualProbe_Easy/val.json": ("visual_probe_easy", 4),
              "VisualProbe_Medium/val.json": ("visual_probe_medium", 4),
              "VisualProbe_Hard/val.json": ("visual_probe_hard", 4)}
    for relative, (source, count) in layout.items():
        (base / relative).parent.mkdir(parents=True, exist_ok=True)
        (base / relative).write_text(json.dumps(rows(source, count)))
    for name in ("OPENAI_API_KEY", "API_KEY"):  # the judge's key: read when the reward manager is built
        monkeypatch.setenv(name, "unused-by-a-dry-run")
    monkeypatch.setenv("END_POINT", "https://example.openai.azure.com")
    monkeypatch.setenv("API_VERSION", "2024-10-21")
    monkeypatch.delenv("BASE_IMAGE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return model, base


def test_the_translated_seed_passes_the_trainers_pre_launch_checks(stand_ins, tmp_path, monkeypatch, capsys):
    """The acceptance check: the recipe's command -> tools/from_verl.py -> `python -m megatron_minio3.trainer.grpo
    --config <it> --dry-run` on the cluster the command names (8 nodes x 8 GPUs): every check passes, nothing starts."""
    from megatron_minio3.trainer import grpo

    model, base = stand_ins
    script = tmp_path / "run_minio3.sh"
    script.write_text(seed_command())
    out = tmp_path / "minio3.yaml"
    code = main([str(script), "-o", str(out), "--env", f"BASE_IMAGE_DIR={base}", "--model", str(model)])
    report, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {out}" in report
    assert "actor_rollout_ref.rollout.n=16 -> rollout.n = 16" in report
    assert "algorithm.kl_ctrl.kl_coef=0.001: a KL penalty subtracted from the reward" in report
    assert "trainer.total_epochs=100 -> trainer.total_steps = 100" in report  # floor(360 rows / 256) x 100
    cfg = load_config(out)
    assert cfg.model == str(model) and cfg.data.image_dir == str(base)

    monkeypatch.setattr(grpo, "GRPOTrainer", lambda *args: pytest.fail("a dry run started the trainer"))
    code = grpo.main(["--config", str(out), "--dry-run"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    assert "verdict: fits" in stdout and "dry run: every pre-launch check passed" in stdout
    assert "GPUs: 64 needed on 8 node(s), 64 available" in stdout
    assert not (tmp_path / "save").exists()  # trainer.default_local_dir=./save: nothing written


def test_command_line_arguments_after_the_double_dash(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BASE_IMAGE_DIR", "/data")
    out = tmp_path / "cli.yaml"
    code = main(["-o", str(out), "--", "python3", "-m", "verl.trainer.main_ppo", "actor_rollout_ref.rollout.n=8",
                 "data.train_files=[${VISUALPROBE_TRAIN_DATA}]", "trainer.total_training_steps=7",
                 "actor_rollout_ref.rollout.val_n=32", "actor_rollout_ref.rollout.val_do_sample=True",
                 "trainer.val_only=True", "trainer.some_new_knob=3"])
    report, err = capsys.readouterr()
    assert code == 0, err
    cfg = load_config(out)
    assert cfg.rollout.n == 8 and cfg.trainer.total_steps == 7 and cfg.eval.k == 32
    assert cfg.data.train_files == ["/data/VisualProbe_train/train.json"] and cfg.data.image_dir == "/data"
    assert "trainer.val_only=True: run `python -m megatron_minio3.trainer.eval" in report
    assert "not known to this translator:\n    trainer.some_new_knob=3: no rule for this flag" in report
    assert "$VISUALPROBE_TRAIN_DATA was not set: the seed's layout gives /data/VisualProbe_train/train.json" in report


def test_an_unknown_flag_is_reported_unmapped_not_an_error():
    translation = translate(["actor_rollout_ref.rollout.brand_new=1", "actor_rollout_ref.rollout.n=4"])
    unknown = outcome_of(translation, "actor_rollout_ref.rollout.brand_new")
    assert (unknown.status, unknown.group) == (UNMAPPED, G_UNKNOWN) and unknown.reason
    assert translation.tree["rollout"]["n"] == 4


@pytest.mark.parametrize("args, message", [
    (["actor_rollout_ref.rollout.n"], "'actor_rollout_ref.rollout.n' is not a verl override of the form "
                                      "section.key=value"),
    (["=3"], "'=3' is not a verl override"),
    (["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.rollout.n=8"], "actor_rollout_ref.rollout.n is given twice"),
    (["actor_rollout_ref.rollout.n=many"], "actor_rollout_ref.rollout.n=many: expects an integer"),
    (["trainer.logger=[console"], "trainer.logger=[console: '[console': [ without its closing ]"),
    (["actor_rollout_ref.rollout.limit_mm_per_prompt=12"], "limit_mm_per_prompt=12: expects {image: N}"),
])
def test_malformed_arguments_are_errors_naming_them(args, message):
    with pytest.raises(TranslationError) as err:
        translate(args)
    assert message in str(err.value)


def test_the_cli_reports_errors_on_one_line_with_status_2(tmp_path, capsys):
    assert main(["-o", str(tmp_path / "x.yaml"), "--", "data.train_batch_size"]) == 2
    assert capsys.readouterr().err.strip() == ("error: 'data.train_batch_size' is not a verl override of the form "
                                               "section.key=value")
    script = tmp_path / "run.sh"
    script.write_text("python3 -m verl.trainer.main_ppo \\\n  data.train_files=[${MY_TRAIN}] \\\n  trainer.nnodes=1\n")
    assert main([str(script), "-o", str(tmp_path / "x.yaml")]) == 2
    assert "line 2: data.train_files=[${MY_TRAIN}]: $MY_TRAIN is not set; export it or pass --env MY_TRAIN=..." \
        in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_hydra_values():
    assert parse_value("{'image': 12}") == {"image": 12}
    assert parse_value("{image: 12}") == {"image": 12}
    assert parse_value("['console','wandb']") == ["console", "wandb"]
    assert parse_value("[a, b]") == ["a", "b"] and parse_value("[]") == []
    assert parse_value("1e-6") == 1e-6 and parse_value("0.000") == 0.0 and parse_value("256") == 256
    assert parse_value("True") is True and parse_value("false") is False and parse_value("null") is None
    assert parse_value("'Mini-o3'") == "Mini-o3" and parse_value("Mini-o3") == "Mini-o3"
    assert parse_value("./save") == "./save"
    flags, others = parse_flags(["+trainer.nnodes=2", "--config-name=ppo", "~trainer.logger"])
    assert [(f.key, f.value) for f in flags] == [("trainer.nnodes", 2)]
    assert [o.status for o in others] == [UNMAPPED, UNMAPPED]


def test_shell_quotes_continuations_and_variables():
    env = {"HOME": "/home/me", "EMPTY": ""}
    script = r"""#!/bin/bash
set -x  # a comment
export BASE_IMAGE_DIR=/data/mini-o3
RUN=minio3 EXP="Mini-o3 RL"
LOG=${LOG_DIR:-/tmp}/${RUN}.log
CUDA_VISIBLE_DEVICES=0,1 python3 -m verl.trainer.main_ppo \
    'actor_rollout_ref.rollout.limit_mm_per_prompt={'image': 12}' \
    trainer.logger=['console','wandb'] \
    trainer.experiment_name="$EXP" \
    trainer.project_name='$RUN' \
    trainer.default_local_dir=${HOME}/save_${RUN} \
    data.val_files=[${EMPTY:-none},${EMPTY-set}] \
    data.x=a\ b\$c \
    trainer.n_gpus_per_node=8 2>&1 | tee $LOG
echo done > /dev/null; echo "$UNSET_ELSEWHERE"
"""
    assigned = dict(env)
    commands = parse_script(script, assigned.get, assigned.__setitem__)
    verl = next(c for c in commands if "verl.trainer.main_ppo" in c.texts)
    assert verl.assignments == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert verl.texts[3:] == [
        "actor_rollout_ref.rollout.limit_mm_per_prompt={image: 12}",  # bash joins the quoted pieces
        "trainer.logger=[console,wandb]",
        "trainer.experiment_name=Mini-o3 RL",
        "trainer.project_name=$RUN",  # single quotes: no expansion
        "trainer.default_local_dir=/home/me/save_minio3",
        "data.val_files=[none,]",  # :- replaces an empty value, - only an unset one
        "data.x=a b$c",
        "trainer.n_gpus_per_node=8",  # 2>&1 and the pipe are not arguments
    ]
    assert [c.texts for c in commands if c.texts[0] == "tee"] == [["tee", "/tmp/minio3.log"]]
    assert assigned["BASE_IMAGE_DIR"] == "/data/mini-o3" and assigned["EXP"] == "Mini-o3 RL"
    assert commands[-1].texts == ["echo", "${UNSET_ELSEWHERE}"] and commands[-1].words[1].unset == \
        ["UNSET_ELSEWHERE"]  # recorded, not an error: that command does not matter

    args, found = read_command(script, env)
    assert args[0].startswith("actor_rollout_ref.rollout.limit_mm_per_prompt")
    assert found["environment"]["BASE_IMAGE_DIR"] == "/data/mini-o3"  # for data.image_dir
    args, found = read_command(script, env, {"BASE_IMAGE_DIR": "/elsewhere", "HOME": "/h"})
    assert found["environment"]["BASE_IMAGE_DIR"] == "/elsewhere" and "trainer.default_local_dir=/h/save_minio3" in args


@pytest.mark.parametrize("script, message", [
    ("python3 -m verl.trainer.main_ppo a.b=$(cat x)", "line 1: command substitution $(...) is not supported"),
    ("python3 -m verl.trainer.main_ppo a.b=`cat x`", "command substitution `...` is not supported"),
    ("python3 -m verl.trainer.main_ppo a.b=$1", "line 1: $1 (a shell parameter) is not supported"),
    ("python3 -m verl.trainer.main_ppo \\\n  a.b='x", "line 2: unterminated single quote"),
    ("python3 -m verl.trainer.main_ppo a.b=\"x", "line 1: unterminated double quote"),
    ("echo hi\npython3 -m verl.trainer.main_ppo \\\n  a.b=${NOPE}", "line 3: a.b=${NOPE}: $NOPE is not set"),
    ("echo hi", "no `python3 -m verl.trainer.main_ppo ...` command found"),
    ("python3 -m verl.trainer.main_ppo a.b=1\npython -m verl.trainer.main_ppo a.b=2", "2 verl.trainer.main_ppo "
                                                                                       "commands (lines 1, 2)"),
])
def test_scripts_that_cannot_be_read_are_errors_naming_the_line(script, message):
    with pytest.raises((TranslationError, ShellSyntaxError)) as err:
        read_command(script, {})
    assert message in str(err.value)


def test_a_seed_data_variable_names_its_layout_when_unset():
    with pytest.raises(TranslationError) as err:
        read_command(seed_command(), {})
    assert ("$VISUALPROBE_TRAIN_DATA is not set; export it or pass --env VISUALPROBE_TRAIN_DATA=..., or "
            "BASE_IMAGE_DIR for the seed's layout ($BASE_IMAGE_DIR/VisualProbe_train/train.json)") in str(err.value)
    args, found = read_command(seed_command(), {"VISUALPROBE_TRAIN_DATA": "/mine/train.json", "BASE_IMAGE_DIR": "/d"})
    assert "data.train_files=[/mine/train.json,/d/DeepEyes_train_4K/train.json]" in args
    assert "VISUALPROBE_TRAIN_DATA" not in found["defaults"] and "DEEPEYES_TRAIN_4K_DATA" in found["defaults"]


def test_epochs_become_steps_from_the_dataset_size(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"images": []}] * 1000))
    args = [f"data.train_files=[{train}]", "data.train_batch_size=256", "trainer.total_epochs=3"]
    assert translate(args).tree["trainer"]["total_steps"] == 3 * 3  # floor(1000 / 256) batches per epoch
    doubled = translate(args + ["trainer.rejection_sample=True", "trainer.rejection_sample_multiplier=2"])
    assert doubled.tree["trainer"]["total_steps"] == 3 * 1  # a dataloader batch of 512 prompts
    missing = translate(["data.train_files=[/nowhere/train.json]", "trainer.total_epochs=3"])
    assert outcome_of(missing, "trainer.total_epochs").status == UNMAPPED
    assert "is not on this machine: pass --train-size N" in outcome_of(missing, "trainer.total_epochs").reason
    assert translate(["trainer.total_epochs=3"], train_size=600).tree["trainer"]["total_steps"] == 6
    with pytest.raises(TranslationError, match="fewer than one batch of 256"):
        translate(["trainer.total_epochs=3"], train_size=100)


def test_kl_and_scorer_flags_follow_the_seeds_logic():
    on = translate(["actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.01",
                    "actor_rollout_ref.actor.kl_loss_type=kl"])
    assert on.tree["algorithm"]["kl_coef"] == 0.01 and on.tree["algorithm"]["kl_estimator"] == "k1"
    off = translate(["actor_rollout_ref.actor.use_kl_loss=False", "actor_rollout_ref.actor.kl_loss_coef=0.01"])
    assert off.tree["algorithm"]["kl_coef"] == 0 and outcome_of(off, "actor_rollout_ref.actor.kl_loss_coef").status \
        == IMPLIED
    rules = translate(["reward_model.use_hybrid_reward_manager=False", "data.general_qa_reward_fn=general_qa_tool_mc",
                       "data.gpt_general_qa_reward_fn=general_qa_tool"])
    assert rules.tree["reward"]["default_verifier"] == "mc"
    assert outcome_of(rules, "data.gpt_general_qa_reward_fn").status == IMPLIED  # unused without the hybrid manager
    penalty = translate(["data.tool_call_penalty=0.1"]).tree["reward"]
    assert (penalty["tool_terms"], penalty["tool_call_penalty"]) == ("original", 0.1)  # the seed's formula
    whole = translate(["data.gpt_extract_answer=False", "data.extract_answer_tags=strict"])
    assert whole.tree["reward"]["judge"]["answer_extraction"] == "none"
    assert outcome_of(whole, "data.extract_answer_tags").status == IMPLIED  # unused without gpt_extract_answer


def test_the_layout_fills_the_seeds_gpus():
    assert translate(["trainer.nnodes=2", "trainer.n_gpus_per_node=8"]).tree["parallel"]["dp"] == 8  # 16 / tp 2
    kept = translate(["trainer.nnodes=2"], sets=["parallel.dp=2"])
    assert kept.tree["parallel"]["dp"] == 2 and kept.sources["parallel.dp"] == "--set parallel.dp=2"
    with pytest.raises(TranslationError, match="do not split into groups of parallel tp 2"):
        translate(["trainer.nnodes=1", "trainer.n_gpus_per_node=3"])
    # verl's Ulysses sequence parallelism becomes our context parallelism, and the data-parallel size makes room
    ulysses = translate(["trainer.nnodes=1", "trainer.n_gpus_per_node=8",
                         "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"])
    assert (ulysses.tree["parallel"]["cp"], ulysses.tree["parallel"]["dp"]) == (2, 2)  # 8 GPUs / (tp 2 x cp 2)
    assert outcome_of(ulysses, "actor_rollout_ref.actor.ulysses_sequence_parallel_size").status == MAPPED


def test_the_docs_table_lists_every_seed_flag():
    table = markdown_table(translate(seed_args(), train_size=8000))
    assert table.count("\n| `") == 78
    docs = DOCS_TABLE.read_text(encoding="utf-8")
    for arg in seed_args():
        key = arg.split("=", 1)[0]
        assert f"| `{key}=" in docs, key


def test_the_config_package_imports_nothing_else_of_ours():
    code = ("import sys, megatron_minio3.config.from_verl; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_minio3') "
            "and not m.startswith('megatron_minio3.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "['megatron_minio3']"
