"""The faster training paths are the same maths: the compiled chunked ops against the eager ones
(outputs, final state, gradients), a compiled training run's losses against an eager one's, the
fine-tuning loss's in-forward gradient under a scaled loss, and malloc keeping freed memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2r.ops.dispatch import attention_op
from t2r.ops.reference import causal_linear_attention
from t2r.ops.toolchain import cpp_compiler_missing
from t2r.ops.windowed import windowed_attention
from t2r.training.compiled_attention import why_not_compiled
from t2r.training.objectives import Finetune
from tests.conftest import VOCAB, tiny_model
from tests.test_model import converted, trained_looking_model
from tests.test_ops import assert_close, inputs
from tests.test_ops import run as run_linear
from tests.test_windowed_ops import LINEAR_HEADS, make_case
from tests.test_windowed_ops import run as run_hybrid

# Inductor fuses and reorders the elementwise steps and reductions: the same fp32 sums in another
# order, so results move by a few ulps of values of order 1 (the ops' own tolerances cover that).
HYBRID_GRADIENT_TOLERANCE = 1e-4  # as the chunked-vs-reference comparison: gradients sum over more terms


@pytest.fixture
def compiler() -> None:
    """The compiled path needs a C++ compiler on a CPU; this machine kind has one: its absence fails."""
    assert cpp_compiler_missing() is None, cpp_compiler_missing()


@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_the_compiled_hybrid_op_is_the_eager_op(compiler, linear_heads: str) -> None:
    decay = LINEAR_HEADS[linear_heads][1]
    eager = attention_op("chunked", 8, hybrid=True)
    compiled = attention_op("chunked", 8, hybrid=True, compiled=True)
    # the compiled wrapper, not the eager function (inside the router for cached states and the
    # one for a single chunk, ops.dispatch)
    assert compiled.args[0].args[0].func is not eager.args[0].args[0].func
    expected = run_hybrid(eager, make_case(65, 4, sinks=3, linear_heads=linear_heads), decay)
    got = run_hybrid(compiled, make_case(65, 4, sinks=3, linear_heads=linear_heads), decay)
    reference = run_hybrid(windowed_attention, make_case(65, 4, sinks=3, linear_heads=linear_heads), decay)
    assert_close(got[0], expected[0], "output")
    assert_close(got[0], reference[0], "output against the reference")
    for index, (a, b) in enumerate(zip(got[1], expected[1], strict=True)):
        assert_close(a, b, f"final state {index}")
    for index, (a, b) in enumerate(zip(got[3], expected[3], strict=True)):
        assert_close(a, b, f"gradient {index}", tolerance=HYBRID_GRADIENT_TOLERANCE)


def test_the_compiled_linear_op_is_the_eager_op(compiler) -> None:
    leaves = inputs(70, "hedgehog")
    compiled = attention_op("chunked", 16, compiled=True)
    ref_out, ref_state, ref_grads = run_linear(causal_linear_attention, leaves)
    out, state, grads = run_linear(compiled, leaves)
    assert_close(out, ref_out, "output")
    assert_close(state.kv, ref_state.kv, "final kv")
    assert_close(state.k_sum, ref_state.k_sum, "final k_sum")
    for grad, ref_grad, leaf in zip(grads, ref_grads, ["q", "k", "v", "kv0", "k_sum0"], strict=True):
        assert_close(grad, ref_grad, f"grad {leaf}")


def test_a_compiled_run_trains_as_an_eager_run(compiler, tmp_path: Path, monkeypatch) -> None:
    from tests.test_train import tiny_trainer

    runs = {}
    for compile_ in (False, True):
        monkeypatch.delenv("T2R_NO_COMPILE", raising=False)
        out = tmp_path / f"compile-{compile_}"
        trainer = tiny_trainer(out, transfer_steps=3, finetune_steps=2, compile=compile_)
        assert trainer.compiled is compile_
        trainer.run(resume=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["compiled_attention"] is compile_
        runs[compile_] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r]  # fmt: skip
    # Three AdamW steps of a tiny model from the same start: differences of reduction order (~1e-7)
    # grow through a few updates to well under 1e-4 of losses of order 1.
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)


def test_why_a_run_is_not_compiled(monkeypatch) -> None:
    monkeypatch.delenv("T2R_NO_COMPILE", raising=False)
    assert why_not_compiled("cpu", 1) is None  # this machine kind has a compiler
    assert "several processes" in why_not_compiled("cpu", 2)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler" in why_not_compiled("cpu", 1)
    assert why_not_compiled("cuda", 1) is None  # a GPU compiles with Triton, not a C++ compiler
    monkeypatch.setenv("T2R_NO_COMPILE", "1")
    assert why_not_compiled("cpu", 1) == "T2R_NO_COMPILE is set"


def test_the_chunked_loss_gradient_follows_a_scaled_loss() -> None:
    """backward of a * loss (gradient accumulation divides the loss) gives a times the gradients."""
    teacher = tiny_model("llama")
    student = trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))
    ids = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    mask, rows = torch.ones_like(ids), torch.tensor([True, False])
    with torch.no_grad():
        teacher_out = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    grads = []
    for scale in (1.0, 0.25):
        student.zero_grad(set_to_none=True)
        objective = Finetune(student, 0.5, 1.0, 2.0, 6, lambda h: student.adapter.logits(teacher, h))
        (objective(ids, mask, rows, teacher_out)[0] * scale).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        # the same kernels on the same inputs, the gradient multiplied by 0.25 (exact in binary)
        torch.testing.assert_close(grads[1][name], grad * 0.25, rtol=1e-6, atol=1e-9, msg=name)


def test_freed_memory_stays_mapped_after_keep_freed_memory() -> None:
    """In a fresh process: a 64 MB block that malloc hands out, is written and freed, page-faults
    again the next time by default (malloc unmaps it); after keep_freed_memory() it stays mapped."""
    script = """
import ctypes, resource
from t2r.training.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def use_and_free():
    block = libc.malloc(64 << 20); ctypes.memset(block, 1, 64 << 20); libc.free(block)
def faults_of_the_second_use():
    use_and_free(); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    use_and_free(); return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults_of_the_second_use()
applied = keep_freed_memory()
print(applied, default, faults_of_the_second_use())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    applied, default, kept = result.stdout.split()
    assert applied == "True"  # glibc on Linux: this machine kind
    # 64 MB is 16,384 pages of 4 KiB: by default each is faulted in again; kept, almost none are.
    assert int(default) > 10_000 and int(kept) < 1_000, (default, kept)
