"""Plans with micro-batches and no pipeline (``Plan(dp=2, microbatches=k)``): the model's call runs k micro-batches,
each one's forward and backward, and reduces gradients once; training matches a plain process on the global
batch (tests/conftest.py's policy), and one micro-batch's activations live at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_parameters, assert_same_training, assert_same_values, launch_script
from own_batches import GPT, GPTConfig, nanogpt
from scenarios import build, train
from test_single_device_equivalence import load_checkpoint

import onegpu
from onegpu.errors import UsageError
from onegpu.plan import Plan

BATCH = 10  # tests/scripts/train_micro_batches.py: slices of 5 rows, micro-batches of 3 and 2, or 2, 1, 1 and 1
DATA_PARALLEL = [  # (run, scenario, workers)
    ("hf-ddp-k2", "hf", 2),  # Hugging Face token loss: labels with -100, micro-batches of unequal tokens
    ("hf-fsdp-checkpoint-k4", "hf", 2),  # ZeRO-3 and activation checkpointing, micro-batches of 2, 1, 1, 1
    ("custom-zero2-k2", "custom", 2),  # a hand-written module returning a bare loss, ZeRO-2
    ("external-loss_fn-k2", "external", 2),  # a model without a loss, given loss_fn
    ("hf-dp2-tp2-k2", "hf", 4),  # tensor parallel inside each replica
]


@pytest.fixture(scope="module")
def reference():
    return {s: train(s, batch=BATCH) for s in ("hf", "custom", "external")} | {"nanogpt": nanogpt()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {w: launch_script(tmp_path_factory, "train_micro_batches.py", workers=w) for w in (2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "scenario", "workers"), DATA_PARALLEL)
def test_micro_batches_train_like_one_device(reference, runs, name, scenario, workers):
    out, results = runs[workers]
    run = results[name]
    assert run["local_batch_sizes"] == [5] * 4, "each call is this replica's slice, whole"
    assert_same_training(run, reference[scenario], trained=load_checkpoint(scenario, out / name))


@pytest.mark.slow
def test_gradients_are_reduced_once_per_call(runs):
    """Each FSDP2 unit reduces its gradients in one collective: k micro-batches per call make as many reductions
    as one forward and backward would, not k times as many."""
    for name, _, workers in DATA_PARALLEL:
        run = runs[workers][1][name]
        assert run["units"] > 0 and run["reductions_per_step"] == [run["units"]] * 4, name
    nanogpt_run = runs[2][1]["nanogpt-fsdp-k2"]  # nanoGPT's own accumulation: two calls per optimizer step
    assert nanogpt_run["reductions_per_step"] == [2 * nanogpt_run["units"]] * 4


@pytest.mark.slow
def test_nanogpt_loop_with_its_own_accumulation(reference, runs):
    """Batches drawn in the loop, ``logits, loss = model(X, Y)``, ``(loss / 2).backward()`` over two calls per
    step, ``count_items``: the loop's scale reaches the gradients each call made, as on one device."""
    run, ref = runs[2][1]["nanogpt-fsdp-k2"], reference["nanogpt"]
    assert_same_values(run["losses"], ref["losses"], what="per-step losses")
    assert_same_values(run["grad_norms"], ref["grad_norms"], what="gradient norms")
    assert run["rows"] == 4, "the logits of this replica's rows, joined over micro-batches"

    def model(parameters: dict) -> torch.nn.Module:
        gpt = GPT(GPTConfig())
        gpt.load_state_dict({k: torch.tensor(v) for k, v in parameters.items()}, strict=False)
        return gpt

    assert_same_parameters(model(run["parameters"]), model(ref["parameters"]))


@pytest.mark.slow
def test_one_worker_runs_micro_batches_like_one_device(reference):
    run = train("hf", batch=BATCH, prepare=onegpu.prepare, plan=Plan(dp=1, microbatches=2))
    assert run["model_class"] == "MicroBatchedLlamaForCausalLM"
    assert_same_training(run, reference["hf"], trained=run["model"])


def llama_batch(rows: int = 8) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model, data = build("hf")
    batch = torch.utils.data.default_collate([data[i] for i in range(rows)])
    return model, batch


class SavedActivations:
    """Bytes of the tensors autograd saves for backward, parameters left out: live now, and the most at once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() in self.parameters:
            return tensor
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, counter: SavedActivations, tensor: torch.Tensor) -> None:
        self.counter, self.tensor, self.bytes = counter, tensor, tensor.numel() * tensor.element_size()
        counter.live += self.bytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self) -> None:
        self.counter.live -= self.bytes


def test_activation_memory_per_call_shrinks_with_micro_batches():
    peaks = {}
    for k in (1, 2, 4):
        model, batch = llama_batch()
        model = onegpu.prepare(model, plan=Plan(dp=1, microbatches=k))
        saved = SavedActivations(model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            model(**batch).loss.backward()
        assert saved.live == 0
        peaks[k] = saved.peak  # measured: 675 kB, 339 kB, 171 kB
    assert peaks[2] < 0.55 * peaks[1] and peaks[4] < 0.3 * peaks[1], peaks


def test_outputs_are_joined_and_evaluation_runs_one_forward():
    model, batch = llama_batch(rows=5)  # micro-batches of 2, 2 and 1
    plain, _ = llama_batch(rows=5)
    expected = plain(**batch)
    model = onegpu.prepare(model, plan=Plan(dp=1, microbatches=3))
    forwards = []
    model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    out = model(**batch)
    assert len(forwards) == 3 and out.past_key_values is None
    assert_same_values(out.loss.item(), expected.loss.item(), what="the global batch's loss")
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert out.logits.shape[0] == 5 and out.logits.argmax(-1).shape == (5, 12)  # readable values
    with torch.no_grad():
        evaluated = model(**batch)
    assert len(forwards) == 4, "evaluation: the whole slice in one forward"
    assert_same_values(evaluated.loss.item(), expected.loss.item(), what="the evaluation loss")


@pytest.mark.parametrize("change", ["a term from the logits", "a term from the parameters"])
def test_a_loss_changed_after_the_forward_is_refused_with_one_line(change):
    model, batch = llama_batch(rows=4)
    model = onegpu.prepare(model, plan=Plan(dp=1, microbatches=2))
    out = model(**batch)
    term = out.logits.mean() if change == "a term from the logits" else sum(p.sum() for p in model.parameters())
    with pytest.raises(UsageError) as error:
        (out.loss + term).backward()
    assert "backward runs inside the model's call" in str(error.value) and "\n" not in str(error.value)
    model(**batch).loss.mul(0.5).backward()  # a multiple of the loss is what the loop may do


def test_a_model_without_its_loss_is_refused_with_one_line():
    model, data = build("external")  # returns its prediction; the loop computes the loss
    model = onegpu.prepare(model, plan=Plan(dp=1, microbatches=2))
    x, y = data.x[:4], data.y[:4]
    with pytest.raises(UsageError) as error:
        model(x)
    message = str(error.value)
    assert "loss_fn=" in message and "microbatches=1" in message and "\n" not in message
    with torch.no_grad():
        assert model(x).shape == (4, 1), "evaluation computes its outputs as before"
    model = onegpu.prepare(build("external")[0], plan=Plan(dp=1, microbatches=2), loss_fn=torch.nn.functional.mse_loss)
    model(x, target=y).backward()
