"""The pieces behind batches the loop builds itself and accumulation under pipelines, without processes."""

import torch

from onegpu.runtime.call_gradients import CallGradients
from onegpu.runtime.call_slicing import fingerprint
from onegpu.runtime.data import SlicedBatches


def test_the_fingerprint_tells_batches_apart():
    x, y = torch.randint(0, 50, (7, 8)), torch.randint(0, 50, (7, 8))
    assert torch.equal(fingerprint([x, y], 7), fingerprint([x.clone(), y.clone()], 7))
    other = x.clone()
    other[-1, 3] += 1  # one token of the last row
    assert not torch.equal(fingerprint([other, y], 7), fingerprint([x, y], 7))
    assert not torch.equal(fingerprint([y, x], 7), fingerprint([x, y], 7))  # order counts


def test_a_loader_s_slices_and_their_views_are_known():
    sliced = SlicedBatches()
    x, y = torch.randn(3, 4), torch.randn(3, 1)
    sliced.mark((x, y))
    assert sliced.holds([x[:, :2]])  # a view of a slice
    assert sliced.holds([torch.randn(3, 4)])  # as many rows as the last slice: left as it is
    assert not sliced.holds([torch.randn(8, 4)])  # a global batch the loop built


def test_a_scaled_loss_scales_only_its_own_call_s_gradients():
    param = torch.nn.Parameter(torch.zeros(3))
    calls = CallGradients([param], mark=lambda: None)
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    for grad in (first, second):
        calls.start()
        assert param.grad is None  # the call's gradients are made apart
        param.grad = grad.clone()  # what the pipeline's backward leaves
        calls.finish()
        calls.confirm(0.5)  # (loss / 2).backward()
    torch.testing.assert_close(param.grad, first * 0.5 + second * 0.5)
