"""Training memory: the loss made chunk by chunk equals the whole-tensor loss (value and gradients),
and the student shares the teacher's frozen tensors instead of copying them."""

from __future__ import annotations

import copy

import pytest
import torch

from t2r.training.objectives import Finetune
from t2r.training.sharing import share_frozen_weights
from tests.conftest import VOCAB, tiny_model
from tests.test_model import converted, trained_looking_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "granite", "gemma3_text"])
def test_the_chunked_loss_is_the_whole_tensor_loss(family: str) -> None:
    teacher = tiny_model(family)
    student = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row: its pads are never scored
    rows = torch.tensor([True, False])
    results = []
    for chunk in (0, 7):
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_out = teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state if chunk else (
                teacher(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
        objective = Finetune(student, 0.5, 1.0, 2.0, chunk, lambda h: student.adapter.logits(teacher, h))
        loss, parts = objective(ids, mask, rows, teacher_out)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), parts, grads))
    (whole, whole_parts, whole_grads), (chunked, chunked_parts, chunked_grads) = results
    assert whole_grads and whole_grads.keys() == chunked_grads.keys()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert chunked_parts == pytest.approx(whole_parts, rel=1e-4, abs=1e-7)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


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
