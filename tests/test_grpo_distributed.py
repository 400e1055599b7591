"""GRPO under `accelerate launch` with two CPU processes (gloo): on the same completions it trains what one process
trains, step by step, writes its checkpoints and metrics once, and resumes from a checkpoint.

Sampling is the one thing that cannot agree: each process draws the tokens of its own share of the prompts. So both
runs sample with `fixed_sample`, whose completions depend only on the prompt and their place in its group; the
launched processes get it from a `sitecustomize` module that the test puts on their PYTHONPATH, and everything else
(the split of the prompts, the gathering of groups, advantages, losses, gradients, metrics, checkpoints) runs as in
any launched run. Their lengths vary, and with them DAPO's overlong penalty: the rewards differ within each group."""

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from align.config import parse_recipe
from align.models.tokens import left_pad
from align.pipeline import run_recipe
from align.run_folder import INTERRUPTED
from align.stages import grpo_rollout
from align.stages.ppo_rollout import decode_mask
from tests.conftest import _tiny_head
from tests.test_accelerate import _log, _max_diff, _metrics, launch_two

# torchrun sets LOCAL_RANK in the processes it starts, not in the launcher, which has no GRPO to patch.
HOOK = """\
import os

if "LOCAL_RANK" in os.environ:
    from align.stages import grpo_rollout
    from tests.test_grpo_distributed import fixed_sample

    grpo_rollout.sample = fixed_sample
"""


def fixed_sample(model, tokenizer, prompt_ids: list[list[int]], cfg, repeats: int = 1):
    """`align.stages.ppo_rollout.sample`'s result, with completions drawn from the prompt's ids and the completion's
    index among the prompt's `repeats`: 1 to max_new_tokens tokens ending in EOS, or max_new_tokens cut off."""
    R, eos, low = cfg.max_new_tokens, tokenizer.eos_token_id, max(tokenizer.all_special_ids) + 1
    rows = []
    for ids in prompt_ids:
        for k in range(repeats):
            draw = torch.Generator().manual_seed(zlib.crc32(repr((ids, k)).encode()))
            tokens = torch.randint(low, len(tokenizer), (R,), generator=draw)
            length = int(torch.randint(1, R + 2, (), generator=draw))
            if length <= R:
                tokens[length - 1] = eos
                tokens[length:] = tokenizer.pad_token_id
            rows.append(tokens)
    response = torch.stack(rows)  # [B * repeats, R]
    prompts = left_pad(prompt_ids, tokenizer.pad_token_id)
    response_mask = decode_mask(response, eos)
    query_response = torch.cat([prompts["input_ids"].repeat_interleave(repeats, 0), response], 1)
    attention_mask = torch.cat([prompts["attention_mask"].repeat_interleave(repeats, 0), response_mask], 1)
    return (query_response.to(model.device), attention_mask.to(model.device), response_mask.float().to(model.device),
            prompts["input_ids"].shape[1])


def _recipe(output_dir: Path) -> str:
    """A fresh policy (no init: the SFT stage, which two processes only approximate, feeds nothing into it), its KL
    to the bare base, `token` aggregation (the one that needs the global token count) and two minibatches a pass."""
    return _tiny_head("tinygrpo", output_dir, "none", sft_steps=1) + """\
  - name: grpo
    kind: grpo
    data: {path: "synthetic:prompts", max_rows: 16}
    eval_data: {path: "synthetic:heldout", max_rows: 4}
    rewards: [{rule: synthetic_tasks}]
    grpo: {prompts_per_step: 4, num_generations: 4, max_new_tokens: 8, minibatch_size: 8, num_iterations: 2,
           aggregation: token, kl_coef: 0.05, overlong_buffer: 4}
    train: {max_steps: 3, save_steps: 2, lr: 5.0e-3, max_length: 96, max_prompt_length: 64}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict]:
    """The recipe run in this process and by two launched processes, all on fixed completions."""
    root = tmp_path_factory.mktemp("grpo_distributed")
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    recipe = root / "two.yaml"
    recipe.write_text(_recipe(root / "two"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", os.environ.get("ALIGN_TEST_CACHE") or str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(grpo_rollout, "sample", fixed_sample)
        run_recipe(parse_recipe(_recipe(root / "one")), quiet=True)
        mp.setenv("PYTHONPATH", str(hooks))  # launch_two puts the repository before it
        launched = launch_two(recipe)
        assert launched.returncode == 0, launched.stderr[-4000:]
        yield {"one": root / "one" / "tinygrpo", "two": root / "two" / "tinygrpo", "recipe": recipe}


def test_two_processes_train_on_the_same_completions_what_one_process_trains(runs):
    one, two = runs["one"], runs["two"]
    log_one, log_two = _log(one, "grpo"), _log(two, "grpo")
    assert [e["step"] for e in log_two] == [1, 2, 3]  # logged once, by the main process
    for a, b in zip(log_one, log_two):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert log_one[-1]["kl"] > 0 and log_one[-1]["reward_std"] > 0  # the policy moved, on rewards that differ
    assert _max_diff(one / "grpo", two / "grpo") < 1e-4
    m1, m2 = _metrics(one, "grpo"), _metrics(two, "grpo")
    for key in ("eval_init_objective/scores", "eval_objective/scores"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
    state = torch.load(two / "grpo" / "checkpoints" / "step-3" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # each process's RNGs, written by the main process


def test_a_launched_grpo_stage_resumes_from_its_last_checkpoint(runs):
    """Interrupted after step 3 had been logged but before its checkpoint: relaunched, it redoes step 3 from step 2."""
    stage_dir = runs["two"] / "grpo"
    straight = _log(runs["two"], "grpo")
    (stage_dir / "checkpoints" / "step-3" / "state.pt").unlink()
    state = json.loads((stage_dir / "stage.json").read_text())
    (stage_dir / "stage.json").write_text(json.dumps({**state, "status": INTERRUPTED}))
    trained = runs["two"].parent / "straight"
    trained.mkdir()
    (stage_dir / "adapter").rename(trained / "adapter")  # the one the uninterrupted run trained
    relaunched = launch_two(runs["recipe"])
    assert relaunched.returncode == 0, relaunched.stderr[-4000:]
    assert json.loads((stage_dir / "stage.json").read_text())["resumed_from"].endswith("step-2")
    resumed = _log(runs["two"], "grpo")
    assert [e["step"] for e in resumed] == [1, 2, 3]
    assert resumed[-1] == pytest.approx(straight[-1], abs=1e-6)
    assert _max_diff(trained, stage_dir) < 1e-6


def test_the_step_and_its_minibatches_must_divide_among_the_processes(tmp_path, monkeypatch):
    from align import distributed
    from align.errors import AlignError
    from align.stages.grpo import check_shares
    from align.stages.kind import KINDS

    assert KINDS["grpo"].check_shares is check_shares  # the pipeline checks it before any stage trains
    stage = parse_recipe(_recipe(tmp_path)).stage("grpo")
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    check_shares(stage)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(AlignError, match=r"stages\.grpo\.grpo\.prompts_per_step: 4 .* 3 processes"):
        check_shares(stage)
    stage = parse_recipe(_recipe(tmp_path).replace("minibatch_size: 8", "minibatch_size: 2")).stage("grpo")
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(AlignError, match=r"stages\.grpo\.grpo\.minibatch_size: 2 .* 4 processes"):
        check_shares(stage)
