"""Per-request sampling seeds (rollout/seeds.py): derived from what a request is (run seed, step, round, prompt,
sample, turn), so a resumed run and an uninterrupted one send the same seed with the same request, whatever the
order requests are made in and however the round is split over rollout handles."""
from __future__ import annotations

from megatron_minio3.rollout.seeds import derive_seed, request_seed, round_prompt_seeds
from tests.unit.test_agent_loop import ScriptedEngine, image_file, make_loop, prompt_for, run, zoom  # noqa: F401


def test_seeds_depend_on_what_the_request_is():
    uids = ["ds/0", "ds/1", "ds/0"]  # a prompt handed out twice in one round gets two seeds
    seeds = round_prompt_seeds(7, step=3, round_index=1, uids=uids)
    assert len(set(seeds)) == 3 and seeds == round_prompt_seeds(7, 3, 1, uids)
    for other in (round_prompt_seeds(8, 3, 1, uids), round_prompt_seeds(7, 4, 1, uids),
                  round_prompt_seeds(7, 3, 2, uids)):
        assert not set(other) & set(seeds)
    # split over two handles as TrainingWorkers.generate_round does: each prompt keeps its seed
    assert seeds[0::2] + seeds[1::2] == [seeds[0], seeds[2], seeds[1]]
    assert all(0 <= s < 2**63 for s in seeds) and derive_seed(1) != derive_seed("1")
    per_request = {request_seed(seeds[0], sample, turn) for sample in range(4) for turn in range(3)}
    assert len(per_request) == 12


def test_every_request_carries_its_own_seed_whatever_the_order(tokenizer, vision, image_file):  # noqa: F811
    def script(request, turn):
        return (zoom(), "stop") if turn == 0 else ("<think>ok</think><answer>B</answer>", "stop")

    prompts = [prompt_for(image_file, "ds/0"), prompt_for(image_file, "ds/1")]
    base = round_prompt_seeds(0, 1, 0, [p.uid for p in prompts])
    sent = []
    for delay in (lambda request, turn: 0.0, lambda request, turn: 0.01 * (hash(request.request_id) % 3)):
        engine = ScriptedEngine(tokenizer, script, delay_s=delay)
        run(make_loop(tokenizer, vision, [engine]), prompts, n=3, seeds=base)
        sent.append({request.request_id.rsplit("#", 1)[0]: request.seed for request in engine.requests})
    assert sent[0] == sent[1] and len(sent[0]) == 12  # 2 prompts x 3 samples x 2 turns, one seed each
    assert len(set(sent[0].values())) == 12
    assert sent[0]["ds/1#2#t1"] == request_seed(base[1], 2, 1)
    engine = ScriptedEngine(tokenizer, script)
    run(make_loop(tokenizer, vision, [engine]), prompts, n=1)
    assert {request.seed for request in engine.requests} == {None}  # no seeds given: the engine's own stream
