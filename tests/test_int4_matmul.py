"""t2r's int4 kernel against its reference (t2r.ops.int4_matmul), at odd sizes and every decode batch."""

from __future__ import annotations

import pytest
import torch

from t2r.ops.int4_matmul import (
    GEMV_ROWS,
    dequantise_int4,
    int4_matmul,
    int4_matmul_reference,
    kernel_available,
    kernel_build_error,
    machine_lacks_kernel,
    quantise_int4,
)

# Skipped only where the machine truly cannot run the kernel (the reason says which); on a machine
# with AVX2 and a compiler a kernel that does not build fails every test below.
needs_kernel = pytest.mark.usefixtures("built_kernel")


@pytest.fixture
def built_kernel() -> None:
    lacking = machine_lacks_kernel()
    if lacking is not None:
        pytest.skip(lacking)
    assert kernel_available(), f"the int4 kernel did not build on a machine that can build it: {kernel_build_error()}"


@needs_kernel
def test_the_kernel_builds_where_the_machine_can_build_it() -> None:
    assert torch.ops.t2r_int4.int4_matmul is not None


def test_blocks_round_trip_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(37, 96)
    blocks = quantise_int4(weight)
    assert blocks.codes.shape == (37, 3, 16) and blocks.codes.dtype == torch.uint8
    assert blocks.steps.shape == blocks.minimums.shape == (37, 3) and blocks.steps.dtype == torch.float16
    grouped = weight.view(37, 3, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15
    error = (dequantise_int4(blocks) - weight).abs().view(37, 3, 32)
    assert (error <= step[..., None] / 2 + weight.abs().max() / 1024).all()


def test_inputs_not_in_whole_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        quantise_int4(torch.randn(8, 40))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, GEMV_ROWS])
@pytest.mark.parametrize(("outputs", "inputs"), [(37, 64), (960, 576), (17, 1536), (5, 96), (3, 32), (40, 288)])
def test_kernel_equals_the_reference_with_rounded_activations(rows: int, outputs: int, inputs: int) -> None:
    """The kernel's arithmetic (int8 activations per block, integer dot products) equals the
    reference that rounds the same way, to fp32 accumulation; and stays near the unrounded product."""
    torch.manual_seed(rows * outputs)
    blocks = quantise_int4(torch.randn(outputs, inputs))
    x = torch.randn(rows, inputs)
    x[0, :32] = 0  # an all-zero block (scale 0)
    got = int4_matmul(x, blocks)
    expected = int4_matmul_reference(x, blocks, round_activations=True)
    assert got.shape == (rows, outputs) and got.dtype == torch.float32
    # Integer dot products are exact in the kernel; what differs is the fp32 scaling and the sum over
    # blocks (another order, FMA): ~1e-7 relative per block, 1e-5 of the largest output leaves 10x.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    exact = int4_matmul_reference(x, blocks)
    # int8 activations: a half step (max / 254) per input, averaging out over the dot product.
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


def test_many_rows_compute_what_the_kernel_computes_row_by_row() -> None:
    """A prefill (more rows than GEMV_ROWS) takes the rounding reference: the same function as the
    kernel's, so prefill and decode agree."""
    torch.manual_seed(1)
    blocks = quantise_int4(torch.randn(24, 64))
    x = torch.randn(GEMV_ROWS + 3, 64)
    expected = int4_matmul_reference(x, blocks, round_activations=True)
    assert torch.allclose(int4_matmul(x, blocks), expected, atol=1e-5, rtol=1e-5)
    row_by_row = torch.cat([int4_matmul(row[None], blocks) for row in x])
    assert torch.allclose(row_by_row, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_compiles_into_a_full_graph() -> None:
    """torch.compile(fullgraph=True) sees the kernel as one op with a known output shape."""
    torch.manual_seed(2)
    blocks = quantise_int4(torch.randn(40, 64))

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(int4_matmul(x, blocks)) * 2

    x = torch.randn(1, 64)
    compiled = torch.compile(project, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), project(x), atol=1e-6)


def test_without_the_kernel_int4_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2r.ops import int4_matmul as module

    monkeypatch.setattr(module, "_loaded", False)
    torch.manual_seed(3)
    blocks = quantise_int4(torch.randn(24, 64))
    x = torch.randn(1, 64)
    expected = int4_matmul_reference(x, blocks, round_activations=True)
    assert torch.allclose(module.int4_matmul(x, blocks), expected, atol=1e-5, rtol=1e-5)


def test_meta_weights_give_the_blocks_shapes_only() -> None:
    """A model built on the meta device to be filled from a file (t2r.modeling.decode_weights):
    the blocks' shapes and dtypes, nothing computed."""
    weight = torch.randn(40, 96)
    real, shapes = quantise_int4(weight), quantise_int4(weight.to("meta"))
    assert all(s.is_meta and (s.shape, s.dtype) == (r.shape, r.dtype) for r, s in zip(real, shapes, strict=True))
