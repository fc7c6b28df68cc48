import torch

from t2r.ops.denormals import flush_denormals


def test_flush_denormals_zeroes_subnormal_values():
    before = torch.tensor([1e-40]) * 1.0
    try:
        if not flush_denormals():  # a CPU without flush-to-zero: nothing changes
            assert before.item() > 0
            return
        assert (torch.tensor([1e-40]) * 1.0).item() == 0.0
        assert (torch.tensor([1e-37]) * 1.0).item() > 0  # normal numbers untouched
    finally:
        torch.set_flush_denormal(False)
