import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Trackio reads TRACKIO_DIR once, when it is first imported: set before any test can import it, it keeps every test's
# runs (and their subprocesses') off the user's ~/.cache/huggingface/trackio
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="align-tests-trackio-")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # The tiny nf4 model is written to the cache; keep tests off the user's ~/.cache.
    monkeypatch.setenv("ALIGN_CACHE",
                       os.environ.get("ALIGN_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_head(name: str, output_dir, quantization: str, sft_steps: int) -> str:
    """The model section and SFT stage that the tiny recipes share. fp32 whatever the CPU (`auto` gives bf16 on
    AVX512-BF16 and AMX CPUs): the tests compare numbers with recomputations and with peers' at fp32 tolerances."""
    return f"""
name: {name}
output_dir: {output_dir}
model:
  base: builtin:tiny
  quantization: {quantization}
  precision: fp32
  lora: {{r: 8, alpha: 16, dropout: 0.0}}
stages:
  - name: sft
    kind: sft
    data: {{path: "synthetic:sft", max_rows: 64}}
    train: {{max_steps: {sft_steps}, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}}
"""


def tiny_recipe(output_dir, quantization: str = "none", dpo_steps: int = 12, save_steps: int = 50,
                extra_dpo: str = "") -> str:
    """A two-stage SFT -> DPO recipe on the tiny random model and the embedded synthetic task."""
    return _tiny_head("tiny", output_dir, quantization, sft_steps=8) + f"""\
  - name: dpo
    kind: dpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:preference", max_rows: 96}}
    eval_data: {{path: "synthetic:preference_heldout", max_rows: 32}}
    loss: {{type: sigmoid, beta: 0.1}}
    train: {{max_steps: {dpo_steps}, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64, \
save_steps: {save_steps}}}
{extra_dpo}
"""


def tiny_ppo_recipe(output_dir, quantization: str = "none", ppo_steps: int = 3, save_steps: int = 50, rewards: str = "",
                    ppo_eval: bool = True) -> str:
    """SFT -> RM -> PPO on the tiny random model and the embedded synthetic task, rule + learned rewards."""
    rewards = rewards or '[{rule: synthetic_tasks, weight: 1.0}, {model: "${rm.adapter}", weight: 0.5}]'
    eval_data = '\n    eval_data: {path: "synthetic:heldout", max_rows: 8}' if ppo_eval else ""
    return _tiny_head("tinyppo", output_dir, quantization, sft_steps=6) + f"""\
  - name: rm
    kind: rm
    init: ${{sft.adapter}}
    data: {{path: "synthetic:preference", max_rows: 64}}
    eval_data: {{path: "synthetic:preference_heldout", max_rows: 16}}
    train: {{max_steps: 6, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}}
  - name: ppo
    kind: ppo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:prompts", max_rows: 32}}{eval_data}
    rewards: {rewards}
    ppo: {{rollout_batch_size: 8, minibatch_size: 4, ppo_epochs: 2, max_new_tokens: 8, kl_coef: 0.05}}
    train: {{max_steps: {ppo_steps}, lr: 3.0e-3, max_length: 96, max_prompt_length: 64, save_steps: {save_steps}}}
"""


def kill_run_after(recipe_path, ready, timeout: float = 240, linger: float = 0.0) -> list[str]:
    """Start `align run recipe_path --quiet`, SIGKILL it once `ready()` is true (and `linger` seconds
    more), and return the command, to run again for the resume."""
    cmd = [sys.executable, "-m", "align.cli", "run", str(recipe_path), "--quiet"]
    env = _repository_first()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(linger)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return cmd


def _repository_first() -> dict[str, str]:
    """The environment with this repository first on PYTHONPATH, before whatever the caller put there."""
    path = [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def rerun(cmd: list[str]) -> None:
    env = _repository_first()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def tiny_rm_run(tmp_path_factory) -> Path:
    """A finished SFT -> reward-model run on the tiny model (`runs/tinyrm/`), for the tests of learned judges.
    Read it; never write into it."""
    from align.config import parse_recipe
    from align.pipeline import run_recipe

    out = tmp_path_factory.mktemp("tiny_rm_run")
    text = _tiny_head("tinyrm", out, "none", sft_steps=4) + """\
  - name: rm
    kind: rm
    init: ${sft.adapter}
    data: {path: "synthetic:preference", max_rows: 32}
    eval_data: {path: "synthetic:preference_heldout", max_rows: 10}
    train: {max_steps: 4, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}
"""
    cache = os.environ.get("ALIGN_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", cache)
        run_recipe(parse_recipe(text), quiet=True)
    return out / "tinyrm"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished SFT -> DPO run on the tiny nf4 model (`runs/tiny/`), shared by the tests that read runs
    (eval, chat, export). Read it; never write into it."""
    from align.config import parse_recipe
    from align.pipeline import run_recipe

    out = tmp_path_factory.mktemp("tiny_run")
    cache = os.environ.get("ALIGN_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", cache)
        run_recipe(parse_recipe(tiny_recipe(out, quantization="nf4", dpo_steps=4)), quiet=True)
    return out / "tiny"


def load_script(name: str):
    """A script of scripts/ (not a package) imported as a module, for tests to call its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

