"""Training: exact resume after SIGKILL, two processes through accelerate, half-written checkpoints,
a non-finite loss, and the objectives themselves (tiny models, a few steps each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2r.errors import T2RError
from t2r.hub import load_converted
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.training.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from t2r.training.config import TrainConfig
from t2r.training.data import TrainingData
from t2r.training.objectives import AttentionTransfer
from t2r.training.trainer import Trainer
from tests.conftest import TRAINING_TEXT, tiny_model

STEPS = ["--transfer-steps", "5", "--finetune-steps", "5", "--checkpoint-every", "2", "--keep", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(TRAINING_TEXT * 40))
    return path


def train_command(teacher: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "t2r",
        "train",
        "--model",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--eval-blocks",
        "2",
        "--feature-map",
        "hedgehog",
        "--untie-qk",
        "--lora-rank",
        "4",
        *STEPS,
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(teacher_folder: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of `train_command` run straight through: what every interrupted run must replay."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    command = [sys.executable, *train_command(teacher_folder, corpus, out)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(run: Path, straight: Path) -> None:
    """Bit for bit: every step's loss (floats compared exactly) and every final weight."""
    assert losses(run) == losses(straight)
    a, _ = load_converted(straight / "model")
    b, _ = load_converted(run / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def losses(out: Path) -> list[tuple[str, int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in records if "loss" in r]


def test_resume_after_sigkill_replays_the_same_losses(
    teacher_folder: Path, corpus: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    expected = losses(uninterrupted)
    assert [(s, i) for s, i, _ in expected] == [("transfer", i) for i in range(5)] + [("finetune", i) for i in range(5)]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, *train_command(teacher_folder, corpus, killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
    )
    deadline = time.time() + 300
    # Kill hard in the fine-tuning stage, after its first checkpoint, mid-run.
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and sum(s == "finetune" for s, _, _ in losses(killed)) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()
    resumed = subprocess.run(
        [sys.executable, *train_command(teacher_folder, corpus, killed), "--resume"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(killed, uninterrupted)


def test_two_processes_through_accelerate(teacher_folder: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # accelerate's torchrun launcher (`--multi_gpu`) is its multi-process launcher; without GPUs
    # t2r's Accelerator runs the processes on the CPU with gloo.
    launch = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    args = train_command(teacher_folder, corpus, out)
    result = subprocess.run([*launch, *args], capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert len(losses(out)) == 10  # one log line a step: only the main process writes
    assert losses(out)[-1][1] == 4
    assert json.loads((out / "summary.json").read_text())["tokens"] == 10 * 4 * 32 * 2
    model, _ = load_converted(out / "model")
    assert model.config.feature_map == "hedgehog"


def tiny_trainer(out: Path, **overrides) -> Trainer:
    torch.manual_seed(0)
    student = convert(tiny_model("llama"), T2RConfig(feature_map="t2r", chunk_size=16, window=8))
    blocks = torch.randint(3, 300, (24, 32), generator=torch.Generator().manual_seed(0))
    data = TrainingData(blocks[:20], torch.ones(20, dtype=torch.bool), blocks[20:], [])
    settings = (
        dict(transfer_steps=6, finetune_steps=0, batch_size=2, seq_len=32, checkpoint_every=2, eval_blocks=2)
        | overrides
    )
    return Trainer(student, tiny_model("llama"), data, TrainConfig(**settings), out, {}, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    trainer = tiny_trainer(tmp_path / "run")
    calls = {"n": 0}
    original = AttentionTransfer.forward

    def poisoned(self, records, mask):
        calls["n"] += 1
        loss, per_layer = original(self, records, mask)
        return (loss * float("nan"), per_layer) if calls["n"] == 4 else (loss, per_layer)

    monkeypatch.setattr(AttentionTransfer, "forward", poisoned)
    with pytest.raises(T2RError, match="non-finite at transfer step 3"):
        trainer.run(resume=False)
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name.endswith("0000001")
    state = load_checkpoint(last, trainer.student, None)
    assert state["stage_step"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def validation_steps(run: Path) -> list[tuple[str, int]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"]) for r in records if "validation" in r]


def test_eval_every_logs_a_held_out_curve_that_survives_a_resume(tmp_path: Path, monkeypatch) -> None:
    """--eval-every 2: a validation after every 2nd step of each stage and at its end; a run that
    failed at transfer step 4 (its checkpoint after step 3) and resumed keeps the curve's points
    up to the checkpoint and makes the rest, each once; validating leaves the student's mode alone."""
    modes = []
    original = AttentionTransfer.forward

    def failing_once(self, records, mask):
        modes.append(trainer.student.training)
        loss, per_layer = original(self, records, mask)
        return (loss * float("nan"), per_layer) if len(modes) == 5 else (loss, per_layer)

    settings = dict(eval_every=2, finetune_steps=4)
    trainer = tiny_trainer(tmp_path / "run", **settings)
    monkeypatch.setattr(AttentionTransfer, "forward", failing_once)
    with pytest.raises(T2RError, match="non-finite at transfer step 4"):
        trainer.run(resume=False)
    assert validation_steps(tmp_path / "run") == [("transfer", 1), ("transfer", 3)]
    trainer = tiny_trainer(tmp_path / "run", **settings)
    trainer.run(resume=True)
    expected = [("transfer", 1), ("transfer", 3), ("transfer", 5), ("finetune", 1), ("finetune", 3)]
    assert validation_steps(tmp_path / "run") == expected
    assert len(set(modes)) == 1 and len(modes) == 5 + 2  # a validation leaves the student's mode as it was


def test_half_written_checkpoint_is_skipped(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path / "run")
    trainer.run(resume=False)
    folder = tmp_path / "run" / "checkpoints"
    newest = latest_checkpoint(folder)
    # A later checkpoint that died before its marker: never chosen.
    broken = folder / "checkpoint-0000009"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(folder) == newest
    (broken / MARKER).write_text("")
    assert latest_checkpoint(folder) == broken


def test_attention_transfer_lowers_its_loss(tmp_path: Path) -> None:
    """A few steps of transfer reduce the MSE to the teacher's attention on a fixed batch."""
    trainer = tiny_trainer(tmp_path / "run", transfer_steps=30, lr_transfer=3e-2, checkpoint_every=100)
    from t2r.training.objectives import record_attention

    ids = trainer.data.blocks[:4]
    mask = torch.ones_like(ids)

    def transfer_loss() -> float:
        with torch.no_grad(), record_attention(trainer.teacher, trainer.student.adapter) as records:
            trainer.teacher(input_ids=ids, attention_mask=mask)
            return AttentionTransfer(trainer.student)(records, mask)[0].item()

    before = transfer_loss()
    trainer.run(resume=False)
    assert transfer_loss() < 0.9 * before


def test_transfer_of_a_parameter_free_map_trains_the_projections(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = convert(tiny_model("llama"), T2RConfig(feature_map="elu", chunk_size=16, window=8))
    blocks = torch.randint(3, 300, (12, 32), generator=torch.Generator().manual_seed(0))
    data = TrainingData(blocks[:10], torch.ones(10, dtype=torch.bool), blocks[10:], [])
    config = TrainConfig(transfer_steps=2, finetune_steps=0, batch_size=2, seq_len=32, eval_blocks=2)
    trainer = Trainer(student, tiny_model("llama"), data, config, tmp_path / "run", {}, progress=False)
    before = {n: p.clone() for n, p in student.named_parameters()}
    trainer.run(resume=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    # The projections (and the hybrid's softmax/linear share) learn; nothing else moves.
    assert any(".projections." in n for n in changed)
    assert all(".projections." in n or n.endswith(".window_logit") for n in changed)


def run_train(teacher: Path, corpus: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`t2r train` on the tiny teacher with blocks of 32 tokens, two to a step."""
    args = [
        "-m",
        "t2r",
        "train",
        "--model",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        *flags,
    ]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment(), timeout=300)


def test_from_scratch_baseline_has_the_teachers_shape_but_not_its_weights(
    teacher_folder: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scratch"
    # No training steps, and a seed unlike the tiny teacher's: the weights are the fresh random ones.
    result = run_train(
        teacher_folder,
        corpus,
        out,
        "--transfer-steps",
        "0",
        "--finetune-steps",
        "0",
        "--feature-map",
        "t2r",
        "--from-scratch",
        "--seed",
        "7",
    )
    assert result.returncode == 0, result.stderr
    model, _ = load_converted(out / "model")
    teacher = tiny_model("llama")
    embedding = model.base.get_input_embeddings().weight
    assert embedding.shape == teacher.get_input_embeddings().weight.shape
    assert not torch.equal(embedding, teacher.get_input_embeddings().weight)
    assert json.loads((out / "manifest.json").read_text())["train_config"]["full"] is True


def test_sigterm_saves_a_checkpoint_and_resume_finishes(
    teacher_folder: Path, corpus: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    """SIGTERM mid-run: the step in flight completes, a checkpoint of it is written, and the resumed
    run ends exactly where an uninterrupted one does."""
    out = tmp_path / "term"
    command = train_command(teacher_folder, corpus, out)
    command[command.index("--checkpoint-every") + 1] = "1000"  # only the signal writes one mid-run
    process = subprocess.Popen(
        [sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment()
    )
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "continue with --resume" in stderr and "Traceback" not in stderr
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None
    done = losses(out)
    assert 2 <= len(done) < 10 and done == losses(uninterrupted)[: len(done)]
    stage, step, _ = done[-1]
    assert json.loads((saved / "trainer.json").read_text())["stage_step"] == step  # the last step done
    assert json.loads((saved / "trainer.json").read_text())["stage"] == stage
    resumed = subprocess.run(
        [sys.executable, *command, "--resume"], capture_output=True, text=True, env=environment(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--data", "{empty}"], "empty"),
        (["--data", "/no/such/file.txt"], "no such file"),
        (["--batch-size", "3", "--grad-accum", "2"], "multiple"),
        (["--resume"], "no run to resume"),
    ],
)
def test_train_usage_errors_are_one_line(extra, words, teacher_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    args = [
        "-m",
        "t2r",
        "train",
        "--model",
        str(teacher_folder),
        "--out",
        str(tmp_path / "out"),
        *[a.format(empty=empty) for a in extra],
    ]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2r: error:") and words in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_existing_run_without_resume(teacher_folder: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    args = ["-m", "t2r", "train", "--model", str(teacher_folder), "--data", str(corpus), "--out", str(out)]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2 and "already holds a run" in result.stderr


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    from t2r.errors import UsageError

    tiny_trainer(tmp_path / "run", transfer_steps=2).run(resume=False)
    with pytest.raises(UsageError, match="train config differs"):
        tiny_trainer(tmp_path / "run", transfer_steps=3).run(resume=True)
    assert tiny_trainer(tmp_path / "run", transfer_steps=2).run(resume=True)  # same settings: fine


def test_train_creates_missing_parent_folders(teacher_folder: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "first"
    result = run_train(teacher_folder, corpus, out, "--transfer-steps", "1", "--finetune-steps", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "model" / "config.json").is_file()
