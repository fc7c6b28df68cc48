"""Training memory: the loss made chunk by chunk, and blocks recomputed in backward (activation
checkpointing), equal the plain loss (value and gradients); the student shares the teacher's frozen
tensors instead of copying them."""

from __future__ import annotations

import copy

import pytest
import torch

from t2r.training.objectives import AttentionTransfer, Finetune, record_attention
from t2r.training.sharing import share_frozen_weights
from tests.conftest import VOCAB, tiny_model
from tests.test_model import converted, trained_looking_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "granite", "gemma3_text"])
def test_the_chunked_and_recomputed_loss_is_the_whole_tensor_loss(family: str) -> None:
    teacher = tiny_model(family)
    student = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row: its pads are never scored
    rows = torch.tensor([True, False])
    results = []
    for chunk, recompute in ((0, False), (7, True)):
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_out = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state if chunk else (
                teacher(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
        objective = Finetune(student, 0.5, 1.0, 2.0, chunk, lambda h: student.adapter.logits(teacher, h), recompute)
        loss, parts = objective(ids, mask, rows, teacher_out)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), parts, grads))
    (whole, whole_parts, whole_grads), (chunked, chunked_parts, chunked_grads) = results
    assert whole_grads and whole_grads.keys() == chunked_grads.keys()
    # Chunked logits sum the same per-position terms in another grouping: fp32 rounding ~1e-7 of the
    # O(1) loss; the parts (a KL near 0 among them) also get an absolute floor.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert chunked_parts == pytest.approx(whole_parts, rel=1e-4, abs=1e-7)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_recomputed_blocks_give_the_same_loss_and_gradients(family: str) -> None:
    """Activation checkpointing alone, for both stages: the same loss and every gradient."""
    teacher = tiny_model(family)
    student = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    with torch.no_grad(), record_attention(teacher, student.adapter) as records:
        logits = teacher(input_ids=ids, attention_mask=mask).logits
    rows = torch.tensor([True, True])
    for stage in ("transfer", "finetune"):
        results, saved = [], []
        for recompute in (False, True):
            student.zero_grad(set_to_none=True)
            count = [0]

            def pack(tensor: torch.Tensor, count: list[int] = count) -> torch.Tensor:
                count[0] += 1  # a tensor autograd keeps for backward
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                if stage == "transfer":
                    loss = AttentionTransfer(student, recompute)(records, mask)[0]
                else:
                    loss = Finetune(student, 0.5, 1.0, 1.0, 0, None, recompute)(ids, mask, rows, logits)[0]
            loss.backward()
            grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
            results.append((loss.detach(), grads))
            saved.append(count[0])
        assert saved[1] < saved[0] / 2, (stage, saved)  # recomputing keeps far fewer tensors
        (plain, plain_grads), (recomputed, recomputed_grads) = results
        assert plain_grads and plain_grads.keys() == recomputed_grads.keys(), stage
        # Recomputation runs the same kernels on the same inputs: the loss agrees to rounding (1e-6 relative),
        # gradients to 1e-5 relative with an absolute floor for entries near 0.
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=f"{stage} {name}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_the_student_holds_the_teachers_frozen_tensors(family: str) -> None:
    teacher = tiny_model(family)
    student = converted(family, "hedgehog", tie_qk=False, window=5)  # its own copy of every weight
    ids = torch.randint(3, VOCAB, (1, 17), generator=torch.Generator().manual_seed(4))
    before = student(ids)[0]
    saved = share_frozen_weights(student, teacher)
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    shared = [
        n for n, p in student.named_parameters(remove_duplicate=False) if p is theirs.get(n.removeprefix("base."))
    ]
    assert shared and not any(".projections." in n or "feature_map" in n for n in shared)
    assert saved == sum(p.numel() * 4 for n, p in student.named_parameters() if n in shared)
    assert torch.equal(student(ids)[0], before)
    # the teacher's tied embeddings stay tied in the student
    head = student.base.get_output_embeddings().weight
    assert head is student.base.get_input_embeddings().weight or not teacher.config.tie_word_embeddings


def test_a_student_that_differs_keeps_its_own_tensors() -> None:
    teacher = tiny_model("llama")
    student = converted("llama", "hedgehog", tie_qk=False, window=5)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    share_frozen_weights(student, other)
    assert student.base.model.embed_tokens.weight is not other.model.embed_tokens.weight
