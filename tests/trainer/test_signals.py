"""SIGTERM (issue #17, item 2): generation notices a stop request within one token, and a real
``reclight fit`` sent SIGTERM in the middle of a long generation exits promptly with status 143.

Before: Lightning's handler only set a flag read between steps, so a long generation ran on for
minutes, and the run then exited with status 0 and no checkpoint. The checkpoint written on
SIGTERM, and the bitwise equality of the run resumed from it, are ``test_resume.py``'s
(``periodic-sigterm-update``, ``lag-sigterm-rollout``).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MICRO
from reclight.engines import stop
from reclight.engines.base import SamplingConfig
from reclight.engines.fast import FastLlamaEngine
from reclight.engines.hf import hf_generate
from reclight.models.loading import load_causal_lm
from reclight.models.tiny import TinyModelConfig, build_tiny

ROOT = Path(__file__).resolve().parents[2]
LONG = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=4096)


@pytest.fixture
def model(tmp_path):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, LONG, seed=3)))
    yield model, tok
    stop.clear_stop()


def count_forwards(module, after, request=True):
    """Wrap ``module.forward`` to request a stop at call number ``after``; returns the counter."""
    calls = {"n": 0}
    real = module.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after and request:
            stop.request_stop("test stop")
        return real(*args, **kwargs)

    module.forward = forward
    return calls


def test_hf_generate_stops_at_the_next_token(model):
    """A stop requested during the 3rd forward (prefill + 2 tokens) of a 4000-token generation:
    HF's stopping criterion ends it after that token, and hf_generate raises instead of returning
    the cut responses."""
    policy, tok = model
    calls = count_forwards(policy, after=3)
    ids, mask = torch.full((2, 4), 10), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(stop.StopRequested, match="hf_generate abandoned: test stop"):
        hf_generate(policy, tok, ids, mask, num_samples=2, max_new_tokens=4000, temperature=0.05)
    assert calls["n"] == 3


def test_fast_engine_stops_between_decoding_steps(model):
    policy, tok = model
    engine = FastLlamaEngine(policy, tok, SamplingConfig(num_samples=2, max_new_tokens=4000, temperature=0.05))
    calls = {"n": 0}
    real = engine._decode_step

    def decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            stop.request_stop("test stop")
        return real(*args, **kwargs)

    engine._decode_step = decode
    ids, mask = torch.full((2, 4), 10), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(stop.StopRequested, match="FastLlamaEngine.generate abandoned: test stop"):
        engine.generate(ids, mask, seed=0)
    assert calls["n"] == 5  # the request made during decoding step 5 is seen before step 6
    stop.clear_stop()
    assert engine.generate(ids[:, :2], mask[:, :2], seed=0).response_ids.shape[:2] == (2, 2)  # usable again


def test_no_stop_request_changes_nothing(model):
    """The stopping criterion never fires without a request: the same greedy tokens as before."""
    policy, tok = model
    ids, mask = torch.full((1, 4), 10), torch.ones(1, 4, dtype=torch.bool)
    a = hf_generate(policy, tok, ids, mask, num_samples=1, max_new_tokens=20, do_sample=False, record_logp=False)
    b = policy.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=20, do_sample=False,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(a[0][0, 0], b[0, 4:4 + a[0].shape[-1]])


def test_sigterm_during_a_long_generation_exits_promptly_with_143(tmp_path):
    """The issue's case: step 0's rollout is made endless (100k-position tiny model, 99,000 new
    tokens, near-greedy, so almost no sample ever ends). SIGTERM 2 s into it: the process must
    exit with 143 having trained no step (it abandoned the rollout: before, it would generate on
    for hours); no checkpoint is written (no step had finished), and it says so."""
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "reclight", "fit", "--config", str(ROOT / "configs" / "smoke_test.yaml"),
           "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
           "--model.policy.tiny", "{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_positions: 100000}",
           "--model.sampling.max_new_tokens", "99000", "--model.sampling.temperature", "0.05",
           "--model.monitor.eval_max_new_tokens", "5",  # a short start-of-RL evaluation
           "--model.engine.name", "hf",  # HF generate's stopping criterion (the fast engine: test above)
           "--trainer.max_steps", "5", "--trainer.val_check_interval", "5"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "start of RL" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # inside step 0's rollout
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    print(f"exited {time.monotonic() - sent:.1f} s after SIGTERM")
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "hf_generate abandoned: received SIGTERM" in text and "before the first training step finished" in text
    assert "reclight fit: stopped by SIGTERM; no checkpoint written" in text
    assert all("reward/mean" not in f.read_text() for f in (tmp_path / "logs").rglob("metrics.csv"))  # no step
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
