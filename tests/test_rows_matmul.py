"""A quantised layer's product by its number of rows (t2r.ops.rows_matmul): the kernels below
`dense_from` rows, the dense copy from there, and one compiled step for every batch of 2 or more."""

from __future__ import annotations

import pytest
import torch

from t2r.modeling import quantize
from t2r.modeling.quantize import Int4Linear, Int8Linear, with_dense_copies, with_weights
from t2r.ops.int4_matmul import GEMV_ROWS, int4_matmul
from t2r.ops.rows_matmul import AMX_DENSE_FROM, dense_layout, dense_matmul, int8_matmul
from tests.test_fast_decode import quantised_tolerance
from tests.test_model import converted, left_padded_batch, trained_looking_model


def layer(kind: str) -> Int4Linear | Int8Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    return Int4Linear(linear) if kind == "int4" else Int8Linear(linear)


def kernel_product(module: Int4Linear | Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes without a dense copy (its kernel or reference), bias included."""
    if isinstance(module, Int4Linear):
        out = int4_matmul(x, module.weight_int4)
    else:
        out = int8_matmul(x, module.weight, module.scale, module.scale_bf16)
    return out + module.bias


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_dense_copy_takes_exactly_the_rows_from_dense_from(kind: str) -> None:
    """Below dense_from rows the product is the kernel's, bit for bit; from dense_from it is the
    dense copy's, bit for bit; with no copy it stays the kernel's at every row count."""
    module = layer(kind)
    inputs = {rows: torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) for rows in (1, 3, 4, 9, 20)}
    without = {rows: module(x) for rows, x in inputs.items()}
    for rows, x in inputs.items():
        assert torch.equal(without[rows], kernel_product(module, x))
    with_dense_copies(module)
    module.dense_from = 4
    assert module.dense is not None and module.dense.shape == (24, 64)
    assert torch.equal(module.dense.float(), module.dequantised().to(module.dense.dtype).float())
    for rows, x in inputs.items():
        expected = dense_matmul(x, module.dense) + module.bias if rows >= 4 else without[rows]
        assert torch.equal(module(x), expected), rows


def test_the_dense_layout_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 from AMX_DENSE_FROM rows with AMX tiles; fp32 past the kernels' rows without; bf16 from
    one row off the CPU (no kernel there)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert dense_layout(torch.device("cpu")) == (torch.bfloat16, AMX_DENSE_FROM)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert dense_layout(torch.device("cpu")) == (torch.float32, GEMV_ROWS + 1)
    assert dense_layout(torch.device("meta")) == (torch.bfloat16, 1)


def test_with_dense_copies_covers_every_quantised_layer_and_only_those() -> None:
    """Every Int4Linear and Int8Linear (the head too) gets a copy; an fp32 model gets none; the
    copies are not among the weights kept on disk (a state_dict holds no `dense`)."""
    torch.manual_seed(0)
    model = with_weights(trained_looking_model(converted("qwen2", "hedgehog", tie_qk=False, window=5)), "int4")
    assert with_dense_copies(trained_looking_model(converted("qwen2", "hedgehog", tie_qk=False, window=5))) is None
    said = with_dense_copies(model)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear | Int8Linear)]
    dtype, dense_from = dense_layout(torch.device("cpu"))
    assert said is not None and f"{dense_from} rows or more" in said
    assert len(layers) == 15 and all(m.dense.dtype == dtype and m.dense_from == dense_from for m in layers)
    assert not [name for name in model.state_dict() if name.endswith("dense")]


def test_the_kernels_row_choice_is_the_python_one() -> None:
    """t2r_int4::int4_linear_rows (C++: what a compiled step of many rows calls for a layer with a
    dense copy) is int4_by_rows, bit for bit, on both sides of dense_from."""
    from t2r.ops.int4_matmul import kernel_available, machine_lacks_kernel
    from t2r.ops.rows_matmul import int4_by_rows

    if machine_lacks_kernel() is not None:
        pytest.skip(machine_lacks_kernel())
    assert kernel_available()
    module = layer("int4")
    with_dense_copies(module)
    for rows in (1, 2, module.dense_from - 1, module.dense_from, 40):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        expected = int4_by_rows(x, *module.weight_int4, module.dense, module.dense_from)
        got = torch.ops.t2r_int4.int4_linear_rows(x, *module.weight_int4, module.dense, module.dense_from)
        assert torch.equal(got, expected), rows


@pytest.mark.parametrize("dense", [True, False], ids=["dense copies", "kernels only"])
@torch.no_grad()
def test_one_compiled_step_serves_batches_on_both_sides_of_dense_from(tmp_path, monkeypatch, dense: bool) -> None:
    """The row count is looked at inside an op (C++ with dense copies, Python without), so the step
    compiled ahead of time for batches of 2 or more (made at batch 2) accepts batches of 5 and of
    18 (past dense_from and past the int4 kernel's rows) without a guard failing, and equals the
    eager step."""
    from t2r.modeling.fast_decode import Decoder, FastState, fast_step

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = with_weights(trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5)), "int4")
    monkeypatch.setattr(quantize, "dense_layout", lambda device: (torch.bfloat16, 4))
    if dense:
        with_dense_copies(model)
    decoder = Decoder(compile=True, backend="aot_eager", artifacts=tmp_path)
    ids, mask = left_padded_batch()
    for rows in (2, 5, 18):
        batch, batch_mask = ids[torch.arange(rows) % ids.shape[0]], mask[torch.arange(rows) % ids.shape[0]]
        _, state = model(batch[:, :17], batch_mask[:, :17], form="chunked")
        token = batch[:, 17].contiguous()
        eager, compiled = FastState.from_model_state(state), FastState.from_model_state(state)
        expected = fast_step(model, token, eager)
        got = decoder(model, token, compiled)
        assert decoder._ahead_by_class[True].guard_check(model, token, compiled), rows
        # int4 rounds activations per block: the two paths can round one apart (test_fast_decode)
        assert (got - expected).abs().max() <= quantised_tolerance("int4") * expected.abs().max(), rows
    assert decoder._step is None  # no call fell back to the lazily compiled step
