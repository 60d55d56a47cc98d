import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from negmargin.errors import UserError
from negmargin.options import TrainConfig
from negmargin.training import learning_rate, train

FAST = dict(arch="conv4", margin=-0.1, temperature=10.0, epochs=4, batch_size=32, lr=0.05, lr_steps=(2, 3),
            warmup_iters=5, val_every=2, val_episodes=10, device="cpu", log_every=1000)


def test_warmup_and_step_learning_rates():
    config = TrainConfig(lr=0.05, lr_steps=(60, 120), lr_gamma=0.1, warmup_iters=3000, warmup_ratio=0.25)
    assert learning_rate(config, 0, 0) == pytest.approx(0.0125)  # 0.25 * lr
    assert learning_rate(config, 2, 1500) == pytest.approx(0.05 * (1 - 0.5 * 0.75))
    assert learning_rate(config, 10, 3000) == pytest.approx(0.05)
    assert learning_rate(config, 59, 99999) == pytest.approx(0.05)
    assert learning_rate(config, 60, 99999) == pytest.approx(0.005)
    assert learning_rate(config, 120, 99999) == pytest.approx(0.0005)
    # warm-up scales the stepped rate if a step comes first
    early = TrainConfig(lr=0.1, lr_steps=(1,), warmup_iters=100, warmup_ratio=0.5)
    assert learning_rate(early, 1, 50) == pytest.approx(0.01 * 0.75)


def test_train_outputs_and_checkpoints(tiny_omniglot, tmp_path):
    summary = train(tiny_omniglot, tmp_path / "run", TrainConfig(**FAST))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "best_1shot.pt", "log.csv", "log.jsonl", "train.json"}
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert ["val" in r for r in rows] == [False, True, False, True]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 and 0 <= r["train_accuracy"] <= 100 for r in rows)
    assert (run / "log.csv").read_text().splitlines()[0].startswith("epoch,iterations,lr,loss,train_accuracy")
    best_epoch = summary["best"]["1"]["epoch"]
    vals = {r["epoch"]: r["val"]["1"]["accuracy"] for r in rows if "val" in r}
    assert vals[best_epoch] == max(vals.values()) and best_epoch == min(e for e, v in vals.items() if v == max(vals.values()))
    for name in ("last.pt", "best.pt", "best_1shot.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "negmargin-ckpt/1" and ckpt["model_spec"]["margin"] == -0.1
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == best_epoch
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 4
    # a complete run is not retrained
    before = (run / "last.pt").stat().st_mtime_ns
    train(tiny_omniglot, run, TrainConfig(**FAST))
    assert (run / "last.pt").stat().st_mtime_ns == before


def test_resume_refuses_a_different_config(tiny_omniglot, tmp_path):
    train(tiny_omniglot, tmp_path / "run", TrainConfig(**{**FAST, "epochs": 1}))
    with pytest.raises(UserError, match="margin=-0.1.*margin=0.2"):
        train(tiny_omniglot, tmp_path / "run", TrainConfig(**{**FAST, "epochs": 1, "margin": 0.2}))


def _cli(data, out, epochs):
    return [sys.executable, "-m", "negmargin", "train", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--margin", "-0.1", "--lr-steps", "3", "--warmup-iters", "5", "--val-every", "2",
            "--val-episodes", "5", "--device", "cpu", "--threads", "1"]


def test_resume_after_kill_is_bitwise_equal(tiny_omniglot, tmp_path):
    epochs = 5
    subprocess.run(_cli(tiny_omniglot, tmp_path / "full", epochs), check=True, capture_output=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_cli(tiny_omniglot, interrupted, epochs), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as epoch 2 is checkpointed
        log = interrupted / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = torch.load(interrupted / "last.pt", weights_only=True)["epoch"]
    assert 2 <= done < epochs, "the kill should land mid-run"
    assert not (interrupted / "train.json").exists()
    result = subprocess.run(_cli(tiny_omniglot, interrupted, epochs), check=True, capture_output=True, text=True)
    assert f"resuming {interrupted} after epoch {done}/{epochs}" in result.stderr
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(interrupted / "last.pt", weights_only=True)
    assert full["iteration"] == resumed["iteration"]
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [r["loss"] for r in full["history"]] == [r["loss"] for r in resumed["history"]]
