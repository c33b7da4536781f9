"""The loss is found in every output shape, under every plan, and is the global batch's; gradients are
weighted once; a loss averaged over items other than samples is exact with ``count_items``; metrics
computed in the loop are the global batch's through ``onegpu.gather``.

Reference: tests/shapes.py's single-device loop run as plain PyTorch in this process, on the same global
batches (fp32, the suite's one tolerance policy, tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from types import MappingProxyType

import pytest
import torch
from conftest import assert_same_parameters, assert_same_training, assert_same_values, launch_script
from safetensors.torch import load_file
from shapes import SHAPES, STEPS, TinyLM, Tokens, accuracy, train, train_on_features

from onegpu.outputs import find_loss, replace_loss

PLANS = {2: ("ddp", "fsdp", "pp2", "tp2"), 3: ("ddp", "fsdp"), 4: ("pp2-dp2",)}
BATCH = {"pp2": 8}  # 4 micro-batches; every other plan: 7 rows (slices 4/3 on 2 replicas, 3/2/2 on 3)


def trained(path, *, shape: str = "tensor") -> torch.nn.Module:
    model = TinyLM(shape=shape)
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model


@pytest.fixture(scope="module")
def reference():
    return {batch: train(batch=batch) for batch in (7, 8)}


@pytest.fixture(scope="module", params=sorted(PLANS))
def workers_run(request, tmp_path_factory):
    return request.param, launch_script(tmp_path_factory, "output_shapes.py", workers=request.param)


def test_every_output_shape_on_one_worker_trains_like_one_device(reference):
    import onegpu

    for shape in SHAPES:
        run = train(shape, prepare=onegpu.prepare)
        assert_same_training(run, reference[7], trained=run["model"])


@pytest.mark.slow
def test_every_output_shape_under_every_plan_trains_like_one_device(workers_run, reference):
    workers, (out, results) = workers_run
    for plan in PLANS[workers]:
        for shape in SHAPES:
            name = f"{shape}-{plan}"
            ref = reference[BATCH.get(plan, 7)]
            assert len(results[name]["losses"]) == STEPS, name
            assert_same_training(results[name], ref, trained=trained(out / name))


# --- the loss counted in items: a token mean with ignore_index, over slices holding different counts -----
@pytest.fixture(scope="module")
def item_reference():
    return {batch: train("tuple_loss_last", batch=batch, ignored=True) for batch in (7, 8)}


@pytest.mark.slow
def test_a_loss_averaged_over_items_is_exact_with_count_items(workers_run, item_reference):
    workers, (out, results) = workers_run
    plans = {2: ("pp2",), 3: ("ddp", "fsdp"), 4: ("pp2-dp2",)}[workers]
    for plan in plans:
        ref = item_reference[8 if plan.startswith("pp2") else 7]
        assert_same_training(results[f"items-{plan}"], ref, trained=trained(out / f"items-{plan}"))
        # weighted by samples, as without count_items, the same loss is not the one device's
        assert results[f"samples-{plan}"]["losses"][1:] != pytest.approx(ref["losses"][1:], rel=1e-3), plan


# --- outputs the loss is computed from, the loss among them or not -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("workers_run", [3], indirect=True)
def test_gradients_are_weighted_once_when_the_loss_and_what_it_came_from_are_outputs(workers_run, reference):
    """3 workers, slices of 3, 2 and 2: the loss returned with the logits it came from (dict, tuples), and a
    loss the loop computes from features and the logits made from them."""
    _, (out, _results) = workers_run
    for name in ("dict-ddp", "tuple_loss_first-fsdp", "tuple_loss_last-ddp", "model_output-fsdp"):
        assert_same_parameters(trained(out / name), reference[7]["model"])
    assert_same_parameters(trained(out / "features-ddp", shape="features"), train_on_features())


# --- metrics through onegpu.gather ---------------------------------------------------------------------
@pytest.mark.slow
def test_an_accuracy_through_gather_is_the_global_batch_accuracy(workers_run):
    workers, (_out, results) = workers_run
    plain = accuracy()
    for name in {2: ("accuracy-tp2",), 3: ("accuracy-ddp", "accuracy-fsdp"), 4: ("accuracy-pp2-dp2",)}[workers]:
        run = results[name]
        assert run["rows"] == [7, 7], f"{name}: the whole batch's rows"
        assert run["batches"] == plain["batches"], f"{name}: in the global batch's order"
        assert_same_values(run["accuracy"], plain["accuracy"], what=name)
    if workers == 3:
        assert results["gathered_ranks"] == [0, 1, 2]  # a 0-dim value: one row per replica


# --- the finder and the replacer, in this process ------------------------------------------------------
Named = namedtuple("Named", "logits loss")


@dataclasses.dataclass(frozen=True)
class Frozen:
    logits: torch.Tensor
    loss: torch.Tensor


def test_the_loss_is_found_and_replaced_in_every_shape_keeping_its_type():
    from transformers.modeling_outputs import CausalLMOutput

    loss, logits, new = torch.tensor(2.0), torch.ones(2, 3), torch.tensor(5.0)
    outputs = [
        loss, {"loss": loss, "logits": logits}, OrderedDict(logits=logits, loss=loss),
        MappingProxyType({"loss": loss}), (loss, logits), (logits, loss), [logits, torch.tensor(3), loss],
        Named(logits, loss), Frozen(logits, loss), CausalLMOutput(loss=loss, logits=logits),
    ]  # fmt: skip
    for output in outputs:
        assert find_loss(output) is loss, type(output).__name__
        replaced = replace_loss(output, new)
        assert type(replaced) is type(output) and find_loss(replaced) is new, type(output).__name__
        if isinstance(output, (tuple, list)):
            assert [v is new for v in replaced] == [v is loss for v in output]  # its position kept
    for without in (logits, (logits,), {"logits": logits}, torch.tensor(3), Named(logits, None), {"loss": logits}):
        assert find_loss(without) is None


@pytest.mark.parametrize("shape", ["features", "dict"])
def test_each_gradient_path_is_weighted_once(monkeypatch, shape):
    """A slice's share (here 1/2) weights the gradient once, whether the model returns its loss with the logits
    it came from (dict) or features and the logits made from them, both in the loss the loop computes."""
    from onegpu.runtime.loss_weighting import Counts, GlobalBatchHooks

    monkeypatch.setattr(Counts, "share", lambda self, items=None: 0.5)
    data = Tokens(samples=3)
    idx, targets = data.idx, data.targets
    gradients = []
    for hooked in (False, True):
        model = TinyLM(shape=shape)
        if hooked:
            GlobalBatchHooks(model, group=None, device=torch.device("cpu"), watchdog=None)
        if shape == "dict":
            loss = model(idx, targets)["loss"]
        else:
            output = model(idx)
            loss = torch.nn.functional.cross_entropy(output["logits"].flatten(0, 1), targets.flatten())
            loss = loss + output["features"].pow(2).mean()
        loss.backward()
        gradients.append([p.grad for p in model.parameters()])
    for plain, weighted in zip(*gradients):
        torch.testing.assert_close(weighted, plain * 0.5, rtol=1e-6, atol=1e-9)


def test_count_items_must_be_a_function_of_the_inputs():
    import onegpu
    from onegpu.errors import UsageError

    with pytest.raises(UsageError, match="count_items must be a function of the model's inputs"):
        onegpu.prepare(torch.nn.Linear(2, 2), count_items=128)


def test_gather_in_one_process_returns_its_input():
    import onegpu

    value = {"hits": torch.tensor([True, False]), "rows": [torch.ones(3, 2)]}
    assert onegpu.gather(value) is value
