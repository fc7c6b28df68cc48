"""Sharded training: `t2r train` under accelerate's FSDP2 config on two CPU processes (gloo),
checked against one process, a resume from a checkpoint, and the combinations t2r refuses.

accelerate (1.15) chooses FSDP on accelerators only; t2r's make_accelerator runs an FSDP launch's
FSDP2 on the CPU as well, which is what lets these runs shard here.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from accelerate.utils import DistributedType

import t2r.training.trainer as trainer_module
from t2r.errors import UsageError
from t2r.hub import load_converted
from tests.test_train import environment, losses, tiny_trainer

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
# A window of 8 under blocks of 32: the hybrid has a linear part to transfer (with the default
# window the blocks fit in it and attention transfer has nothing to learn).
CONVERT = ["--feature-map", "hedgehog", "--untie-qk", "--window", "8"]
SETTINGS = ["--seq-len", "32", "--eval-blocks", "2", "--lora-rank", "4", "--checkpoint-every", "2", "--keep", "3"]
# Two processes of 4 blocks in 2 micro-batches read, at each step, the 8 blocks that one process of
# 8 blocks in 4 micro-batches reads, and average their gradients over the same micro-batches.
TWO = ["--batch-size", "4", "--grad-accum", "2"]
ONE = ["--batch-size", "8", "--grad-accum", "4"]
FSDP = ["accelerate", "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2"]
# Tolerances between one process and two. Both see the same blocks in fp32, single-threaded
# (OMP_NUM_THREADS=1); what differs is the order of the sums: two half-batch gradients reduced
# across the processes instead of one process's accumulation, so each weight update differs by a
# few fp32 roundings (~1e-7 of its size) and the differences compound over the steps.
GRAD_NORM_REL = 1e-4  # a norm over ~1e4 gradient entries, each a few roundings apart after 4 steps
WEIGHT_ABS = 1e-6  # weights of size ~1e-2..1, a few dozen roundings of 6e-8 apart after 8 updates
# The validation KL of a near-converged tiny student is ~4e-4 nats: a relative tolerance would ask
# for ~1e-9 nats, below what a reordered fp32 sum of ~1e2 terms of size ~1 promises (~1e-7 each).
# 1e-6 nats is ten times the rounding seen across machines (4e-8) and 400 times below the KL itself.
KL_ABS = 1e-6
# Perplexity of the tiny random model is in the hundreds: log-perplexity is a mean NLL of size ~5
# whose fp32 rounding, with weights ~1e-6 apart, stays under ~1e-6 relative; 1e-5 leaves 10x room.
PERPLEXITY_REL = 1e-5


def free_port() -> int:
    """A port no other launch holds: two suites (or a suite and a training run) on one machine
    must not meet on accelerate's default rendezvous port 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(launcher: list[str], model: Path, data: Path, out: Path, *extra: str) -> None:
    """One launch. A launch whose rendezvous port was taken between `free_port`'s probe and the
    launch's bind (another process got it from the ephemeral range) is made again on another port:
    the one race this test cannot close; any other failure fails the test with every rank's errors."""
    for _ in range(3):
        port = ["--main_process_port", str(free_port())] if launcher[:2] == ["accelerate", "launch"] else []
        paths = ["--model", str(model), "--data", str(data), "--out", str(out)]
        command = [*launcher, *port, "-m", "t2r", "train", *paths, *SETTINGS, *extra]
        result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
        if result.returncode == 0 or "address already in use" not in result.stderr.lower():
            break
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) + "\n...\n" + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(teacher_folder: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Attention transfer, then fine-tuning of its model, each one FSDP launch of two processes;
    and both stages in one process on the same batches."""
    root = tmp_path_factory.mktemp("sharded")
    folders = {name: root / name for name in ("transfer", "finetune", "one")}
    transfer, finetune = (
        ["--transfer-steps", "4", "--finetune-steps", "0"],
        ["--transfer-steps", "0", "--finetune-steps", "4"],
    )
    train(FSDP, teacher_folder, text_file, folders["transfer"], *TWO, *transfer, *CONVERT)
    train(FSDP, folders["transfer"] / "model", text_file, folders["finetune"], *TWO, *finetune)
    both = ["--transfer-steps", "4", "--finetune-steps", "4"]
    train([sys.executable], teacher_folder, text_file, folders["one"], *ONE, *both, *CONVERT)
    return folders


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_on_two_cpu_processes_trains_like_one_process(runs: dict[str, Path]) -> None:
    one = records(runs["one"])
    for stage in ("transfer", "finetune"):
        sharded = records(runs[stage])
        manifest = json.loads((runs[stage] / "manifest.json").read_text())
        assert (manifest["processes"], manifest["distributed_type"]) == (2, "FSDP")
        assert [(r["stage"], r["step"]) for r in sharded if "loss" in r] == [(stage, i) for i in range(4)]
        # The logged loss is the main process's half of the batch; the gradient norm is the whole
        # batch's, after the reduce-scatter of the shards' gradients.
        norms = [r["grad_norm"] for r in sharded if "loss" in r]
        expected = [r["grad_norm"] for r in one if r["stage"] == stage and "loss" in r]
        assert all(n > 0 for n in norms)
        assert norms == pytest.approx(expected, rel=GRAD_NORM_REL)
        validation = next(r["validation"] for r in sharded if "validation" in r)
        expected_validation = next(r["validation"] for r in one if r["stage"] == stage and "validation" in r)
        assert math.isclose(validation["kl"], expected_validation["kl"], rel_tol=0, abs_tol=KL_ABS)
        assert math.isclose(validation["perplexity"], expected_validation["perplexity"], rel_tol=PERPLEXITY_REL)

    trained, _ = load_converted(runs["finetune"] / "model")
    expected_model, _ = load_converted(runs["one"] / "model")
    transferred, _ = load_converted(runs["transfer"] / "model")
    ours, theirs, before = trained.state_dict(), expected_model.state_dict(), transferred.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=WEIGHT_ABS, msg=name)
    assert any(not torch.equal(ours[name], before[name]) for name in ours)  # fine-tuning changed the model


def test_fsdp_checkpoints_are_gathered_whole(runs: dict[str, Path]) -> None:
    """A checkpoint of the sharded run holds whole tensors, as one process's checkpoint does."""
    sharded = runs["transfer"] / "checkpoints" / "checkpoint-0000003"
    one = runs["one"] / "checkpoints" / "checkpoint-0000003"
    ours = safetensors.torch.load_file(str(sharded / "trainable.safetensors"))
    theirs = safetensors.torch.load_file(str(one / "trainable.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=WEIGHT_ABS, msg=name)
    ours_state = torch.load(sharded / "optimizer.pt", weights_only=True)["state"]
    theirs_state = torch.load(one / "optimizer.pt", weights_only=True)["state"]
    assert ours_state.keys() == theirs_state.keys()
    for index, entry in ours_state.items():
        for key, value in entry.items():
            # AdamW's moments: the first ~ gradients (relative rounding as the norms), the second ~
            # their squares, down to ~1e-12 for parameters the loss barely moves (absolute floor).
            expected = theirs_state[index][key]
            torch.testing.assert_close(value, expected, rtol=GRAD_NORM_REL, atol=1e-9, msg=f"{index} {key}")


def test_fsdp_resume_replays_the_run(runs: dict[str, Path], teacher_folder: Path, text_file: Path, tmp_path: Path):
    """A run that lost its last checkpoint resumes from the one before (the optimizer's state is
    sharded again) and repeats the uninterrupted run bit for bit."""
    out = tmp_path / "resumed"
    shutil.copytree(runs["transfer"], out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-0000003")
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    transfer = ["--transfer-steps", "4", "--finetune-steps", "0"]
    train(FSDP, teacher_folder, text_file, out, *TWO, *transfer, *CONVERT, "--resume")
    assert losses(out) == losses(runs["transfer"])
    resumed, _ = load_converted(out / "model")
    straight, _ = load_converted(runs["transfer"] / "model")
    ours, theirs = resumed.state_dict(), straight.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_fsdp_launch_trains_one_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A sharded student cannot be sharded again for the second stage: refused in one line."""
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP)
    monkeypatch.setattr(trainer_module, "make_accelerator", lambda: sharded)
    with pytest.raises(UsageError, match="under FSDP a launch trains one stage: run --finetune-steps 0"):
        tiny_trainer(tmp_path / "run", finetune_steps=2)


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "t2r trains under FSDP2 only: set fsdp_version: 2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "t2r does not train under DeepSpeed: shard with configs/accelerate"),
    ],
)
def test_unsupported_launches_are_refused(variables: dict[str, str], words: str, monkeypatch) -> None:
    """What an FSDP1 or DeepSpeed launch sets in each process's environment."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=words):
        trainer_module.make_accelerator()
