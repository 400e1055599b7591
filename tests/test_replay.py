"""Replay buffers: the reservoir sample, its files, the exact mix per step, and the same draws after a resume."""

import json
import math
from collections import Counter

import pytest
import transformers

from align.config import parse_recipe
from align.data import synthetic
from align.data.formats import load_examples
from align.data.schemas import PreferenceExample, RankedExample, SFTExample, TaskExample, UnpairedExample
from align.errors import ConfigError
from align.pipeline import run_recipe
from align.replay import ReplayMixer, as_sft, replay_count, reservoir_sample
from tests.conftest import _tiny_head, tiny_ppo_recipe, tiny_recipe

REPLAY = "    replay: {fraction: 0.2, coef: 1.0}\n"  # 8 pairs = 16 sequences a step, so 4 from the buffer


def _run(text):
    return run_recipe(parse_recipe(text), quiet=True)


def _train_logs(stage_dir):
    return [line for line in map(json.loads, (stage_dir / "metrics.jsonl").open()) if "loss" in line]


def test_reservoir_sample_is_uniform_deterministic_and_in_stream_order():
    sample, seen = reservoir_sample(range(10), 20, seed=0)
    assert (sample, seen) == (list(range(10)), 10)  # fewer items than room: all of them
    first, seen = reservoir_sample(range(1000), 50, seed=0)
    assert seen == 1000 and len(set(first)) == 50 and first == sorted(first)
    assert reservoir_sample(range(1000), 50, seed=0)[0] == first
    assert reservoir_sample(range(1000), 50, seed=1)[0] != first
    # Every item has the same chance 50/1000: over 400 seeds each tenth of the stream gets about a tenth.
    tenths = Counter(item // 100 for seed in range(400) for item in reservoir_sample(range(1000), 50, seed)[0])
    assert all(abs(count / (400 * 50) - 0.1) < 0.015 for count in tenths.values()), tenths


def test_the_answer_each_example_teaches():
    prompt, good, bad = ([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "g"}],
                         [{"role": "assistant", "content": "b"}])
    assert as_sft(PreferenceExample(prompt, good, bad)) == SFTExample(prompt, good)
    assert as_sft(RankedExample(prompt, [bad, good, bad], [0.0, 2.0, 1.0])) == SFTExample(prompt, good)
    assert as_sft(UnpairedExample(prompt, good, True)) == SFTExample(prompt, good)
    assert as_sft(UnpairedExample(prompt, bad, False)) is None
    assert as_sft(TaskExample(prompt)) is None


def test_replay_count_makes_the_fraction_of_the_step():
    assert replay_count(0.2, 16) == 4 and 4 / (4 + 16) == 0.2
    assert replay_count(0.5, 4) == 4
    assert replay_count(0.1, 9) == 1


def test_mixer_draws_depend_only_on_seed_and_position_and_cover_the_buffer():
    rows = [([1], [i]) for i in range(10)]
    mixer = ReplayMixer(rows, 0.2, 1.0, seed=3, pad_id=0)
    draws = [mixer.indices(p, 4) for p in range(5)]  # 20 slots: two whole passes over 10 examples
    assert sorted(draws[0] + draws[1] + draws[2][:2]) == list(range(10))
    assert sorted(draws[2][2:] + draws[3] + draws[4]) == list(range(10))
    fresh = ReplayMixer(rows, 0.2, 1.0, seed=3, pad_id=0)  # as after a resume
    assert [fresh.indices(p, 4) for p in (4, 2)] == [draws[4], draws[2]]
    assert ReplayMixer(rows, 0.2, 1.0, seed=4, pad_id=0).indices(0, 4) != draws[0]


def test_sft_buffer_and_mixed_buffer_round_trip_through_disk(tmp_path):
    summary = _run(tiny_recipe(tmp_path, dpo_steps=3, extra_dpo=REPLAY))
    run_dir = tmp_path / "tiny"
    buffer = load_examples(str(run_dir / "sft" / "replay" / "buffer.jsonl"), "sft")
    assert buffer.format == "messages"
    assert buffer.examples == synthetic.load("sft", "sft", n=64)  # 64 rows, room for 2000: all, in order
    provenance = json.loads((run_dir / "sft" / "replay" / "buffer.json").read_text())
    assert provenance["stage"] == "sft" and provenance["source"] == "synthetic:sft" and provenance["seen"] == 64
    mixed = load_examples(str(run_dir / "dpo" / "replay" / "mixed.jsonl"), "sft")
    assert mixed.examples == buffer.examples
    mixed_provenance = json.loads((run_dir / "dpo" / "replay" / "mixed.json").read_text())
    assert mixed_provenance["source"] == str(run_dir / "sft" / "replay" / "buffer.jsonl")
    assert mixed_provenance["source_provenance"] == provenance and mixed_provenance["fraction"] == 0.2
    # DPO's own buffer keeps the chosen answers of its pairs, for a stage after it
    dpo_buffer = load_examples(str(run_dir / "dpo" / "replay" / "buffer.jsonl"), "sft").examples
    assert dpo_buffer == [as_sft(p) for p in synthetic.load("preference", "preference", n=96)]
    assert summary["stages"]["dpo"]["status"] == "done"


def test_every_step_mixes_exactly_the_fraction_and_a_reservoir_of_the_asked_size(tmp_path):
    extra = "    replay: {source: \"${sft.replay}\", fraction: 0.2, coef: 0.5, size: 10}\n"
    _run(tiny_recipe(tmp_path, dpo_steps=4, extra_dpo=extra))
    logs = _train_logs(tmp_path / "tiny" / "dpo")
    assert len(logs) == 4
    assert all(line["replay/sequences"] == 4 and line["replay/fraction"] == 0.2 for line in logs)
    # at step 1 the policy is still its reference, so DPO's part of the loss is log 2: the rest is coef * NLL
    assert logs[0]["loss"] == pytest.approx(math.log(2) + 0.5 * logs[0]["replay/nll"], abs=1e-4)
    assert len(load_examples(str(tmp_path / "tiny" / "dpo" / "replay" / "mixed.jsonl"), "sft").examples) == 10


def test_kto_counts_only_the_answers_it_trains_on(tmp_path):
    # each example also scores another prompt's answer for the KL reference point, with no gradient: not counted
    kto = """\
  - name: kto
    kind: kto
    init: ${sft.adapter}
    data: {path: "synthetic:preference", max_rows: 32}
    train: {max_steps: 2, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}
""" + REPLAY
    _run(_tiny_head("tiny", tmp_path, "none", sft_steps=2) + kto)
    logs = _train_logs(tmp_path / "tiny" / "kto")
    assert [(line["replay/sequences"], line["replay/fraction"]) for line in logs] == [(2, 0.2)] * 2  # 8 answers


def test_without_replay_no_replay_metrics(tmp_path):
    _run(tiny_recipe(tmp_path, dpo_steps=2))
    assert not any(k.startswith("replay/") for line in _train_logs(tmp_path / "tiny" / "dpo") for k in line)
    assert not (tmp_path / "tiny" / "dpo" / "replay" / "mixed.jsonl").exists()


def test_a_resumed_stage_replays_the_same_examples_from_the_same_buffer(tmp_path, monkeypatch):
    drawn: list[tuple[int, list[int]]] = []
    indices = ReplayMixer.indices

    def recording(self, position, count):
        out = indices(self, position, count)
        drawn.append((position, out))
        return out

    monkeypatch.setattr(ReplayMixer, "indices", recording)
    straight = tiny_recipe(tmp_path / "straight", dpo_steps=6, save_steps=3, extra_dpo=REPLAY)
    _run(straight)
    straight_draws, drawn[:] = list(drawn), []

    save = transformers.Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == 3:
            raise KeyboardInterrupt

    resumed = straight.replace(str(tmp_path / "straight"), str(tmp_path / "resumed"))
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(resumed)
    mixed = tmp_path / "resumed" / "tiny" / "dpo" / "replay" / "mixed.jsonl"
    written = mixed.stat().st_mtime_ns
    first_draws, drawn[:] = list(drawn), []
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save)
    summary = _run(resumed)
    assert summary["stages"]["dpo"]["resumed_from"].endswith("checkpoint-3")
    assert first_draws == straight_draws[:3] and drawn == straight_draws[3:]  # positions 3, 4, 5 again
    assert mixed.stat().st_mtime_ns == written  # read back, not sampled again


def test_ppo_adds_the_ptx_term_on_replayed_sft_data(tmp_path):
    text = tiny_ppo_recipe(tmp_path, ppo_steps=2, ppo_eval=False) + "    replay: {fraction: 0.5, coef: 0.5}\n"
    summary = _run(text)
    metrics = summary["stages"]["ppo"]["metrics"]
    assert metrics["replay/sequences"] == 4 and metrics["replay/fraction"] == 0.5  # minibatches of 4 responses
    assert metrics["replay/nll"] > 0
    stage = json.loads((tmp_path / "tinyppo" / "ppo" / "stage.json").read_text())
    assert stage["data"]["replay"]["source"].endswith("sft/replay/buffer.jsonl")


@pytest.mark.parametrize("stages, key, message", [
    ("""  - {name: dpo, kind: dpo, data: {path: p.jsonl}, replay: {fraction: 0.1}}\n""",
     "stages.dpo.replay.source", "no sft stage runs before"),
    ("""  - {name: sft, kind: sft, data: {path: p.jsonl}}
  - {name: ppo, kind: ppo, data: {path: p.jsonl}, rewards: [{rule: synthetic_tasks}]}
  - {name: dpo, kind: dpo, data: {path: p.jsonl}, replay: {source: "${ppo.replay}"}}\n""",
     "stages.dpo.replay.source", "keeps no replay buffer"),
    ("""  - {name: sft, kind: sft, data: {path: p.jsonl}, replay_out: null}
  - {name: dpo, kind: dpo, data: {path: p.jsonl}, replay: {source: "${sft.replay}"}}\n""",
     "stages.dpo.replay.source", "keeps no replay buffer"),
    ("""  - {name: sft, kind: sft, data: {path: p.jsonl}}
  - {name: dpo, kind: dpo, data: {path: p.jsonl}, replay: {fraction: 1.0}}\n""",
     "stages.dpo.replay.fraction", "must be in (0, 1)"),
    ("""  - {name: ppo, kind: ppo, data: {path: p.jsonl}, rewards: [{rule: synthetic_tasks}], """
     """replay_out: {size: 5}}\n""",
     "stages.ppo.replay_out", "no answers to keep"),
])
def test_replay_settings_that_cannot_work_are_config_errors(stages, key, message):
    with pytest.raises(ConfigError) as err:
        parse_recipe("name: r\nmodel: {base: builtin:tiny}\nstages:\n" + stages)
    assert message in str(err.value) and key in str(err.value)


def test_replay_defaults_to_the_last_sft_stage_buffer():
    recipe = parse_recipe("""name: r
model: {base: builtin:tiny}
stages:
  - {name: warmup, kind: sft, data: {path: a.jsonl}}
  - {name: chat, kind: sft, data: {path: b.jsonl}}
  - {name: dpo, kind: dpo, data: {path: p.jsonl}, replay: {fraction: 0.1}}
""")
    assert recipe.stage("dpo").replay.source == "${chat.replay}"
