import math

import pytest
import torch
from torch import nn

from nnssl.ema import ema_alpha, make_ema_teacher, update_ema_
from nnssl.ramps import ConsistencyWeight, linear_rampup, sigmoid_rampup
from nnssl.tensors import unwrap as unwrap_model


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 200) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 200) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(200, 200) == 1.0
    assert sigmoid_rampup(10_000, 200) == 1.0
    assert sigmoid_rampup(-3, 200) == pytest.approx(math.exp(-5))  # clipped at 0
    assert sigmoid_rampup(5, 0) == 1.0
    values = [sigmoid_rampup(t, 50) for t in range(51)]
    assert all(a < b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="rampup_length"):
        sigmoid_rampup(1, -1)


def test_linear_rampup_values():
    assert linear_rampup(0, 10) == 0.0
    assert linear_rampup(2.5, 10) == 0.25
    assert linear_rampup(20, 10) == 1.0
    assert linear_rampup(3, 0) == 1.0


def test_consistency_weight_iteration_unit_uses_integer_division():
    weight = ConsistencyWeight(max_weight=0.1, rampup_length=200, unit="iteration")
    assert weight(iteration=0, epoch=7) == pytest.approx(0.1 * math.exp(-5))
    assert weight(iteration=149, epoch=7) == pytest.approx(0.1 * math.exp(-5))  # 149 // 150 == 0
    assert weight(iteration=150 * 100, epoch=0) == pytest.approx(0.1 * math.exp(-1.25))
    assert weight(iteration=30_000, epoch=0) == pytest.approx(0.1)


def test_consistency_weight_epoch_unit_and_validation():
    weight = ConsistencyWeight(max_weight=0.1, rampup_length=10, unit="epoch")
    assert weight(iteration=10**6, epoch=5) == pytest.approx(0.1 * math.exp(-1.25))
    assert weight(iteration=0, epoch=10) == pytest.approx(0.1)
    linear = ConsistencyWeight(2.0, 10, unit="epoch", shape="linear")
    assert linear(iteration=0, epoch=5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unit"):
        ConsistencyWeight(0.1, 10, unit="iters")
    with pytest.raises(ValueError, match="iter_divisor"):
        ConsistencyWeight(0.1, 10, iter_divisor=0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_make_ema_teacher_is_an_independent_frozen_copy():
    student = _net()
    teacher = make_ema_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()


def test_first_ema_call_copies_student_then_equal_params_are_a_no_op():
    student = _net()
    teacher = make_ema_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))  # even a broken teacher becomes an exact copy at step 0
    assert update_ema_(teacher, student, decay=0.99, step=0) == 0.0
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    before = _params(teacher)
    for step in range(1, 6):
        update_ema_(teacher, student, decay=0.99, step=step)
    for t, b in zip(teacher.parameters(), before):
        assert torch.equal(t, b)


def test_ema_hand_computed_values_and_alpha_schedule():
    student, teacher = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    alpha = update_ema_(teacher, student, decay=0.99, step=10)
    assert alpha == pytest.approx(1 - 1 / 11)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1 / 11))
    assert ema_alpha(0.99, 10_000) == 0.99
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(0.0)
    update_ema_(teacher, student, decay=0.99, step=10_000)
    assert torch.allclose(teacher.bias, torch.tensor([0.01]))
    with pytest.raises(ValueError, match="decay"):
        ema_alpha(1.5, 0)


def test_ema_buffers_only_when_requested():
    student = _net()
    teacher = make_ema_teacher(student)
    student.train()
    student(torch.randn(2, 1, 4, 4, 4))  # changes BN running stats of the student only
    bn_s, bn_t = student[1], teacher[1]
    update_ema_(teacher, student, decay=0.5, step=100)
    assert torch.equal(bn_t.running_mean, torch.zeros(4))
    assert int(bn_t.num_batches_tracked) == 0
    update_ema_(teacher, student, decay=0.5, step=100, include_buffers=True)
    assert torch.allclose(bn_t.running_mean, 0.5 * bn_s.running_mean)
    assert int(bn_t.num_batches_tracked) == int(bn_s.num_batches_tracked) == 1


def test_teacher_gets_no_gradient_and_update_builds_no_graph():
    student = _net()
    teacher = make_ema_teacher(student)
    x = torch.randn(2, 1, 4, 4, 4)
    loss = (student(x) - teacher(x)).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_ema_(teacher, student, decay=0.99, step=3)
    assert all(not p.requires_grad and p.grad_fn is None for p in teacher.parameters())


def test_unwrap_compiled_and_data_parallel_models():
    student = _net()
    wrapped = nn.DataParallel(torch.compile(student))  # wrapping is lazy: nothing is compiled here
    assert unwrap_model(wrapped) is student
    teacher = make_ema_teacher(wrapped)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0)
    update_ema_(torch.compile(teacher), wrapped, decay=0.99, step=0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_mismatched_architectures_raise():
    with pytest.raises(ValueError, match="differ"):
        update_ema_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), decay=0.99, step=1)
    with pytest.raises(ValueError, match="shape"):
        update_ema_(nn.Linear(2, 3), nn.Linear(2, 2), decay=0.99, step=1)


def test_consistency_weight_delay_shifts_the_ramp_as_dhc_recomputes_it_after_each_epoch():
    weight = ConsistencyWeight(0.1, 10, unit="epoch", delay=1)
    assert [weight(0, e) for e in (0, 1)] == [pytest.approx(0.1 * math.exp(-5))] * 2
    assert weight(0, 6) == pytest.approx(0.1 * sigmoid_rampup(5, 10))
    per_iteration = ConsistencyWeight(0.1, 1000, unit="iteration", iter_divisor=1)
    assert per_iteration(250, 0) == pytest.approx(0.1 * sigmoid_rampup(250, 1000))
    with pytest.raises(ValueError, match="delay"):
        ConsistencyWeight(0.1, 10, delay=-1)
