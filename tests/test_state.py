"""onegpu.save_state / onegpu.load_state: a run stopped and continued, on the same plan or another, trains as the
uninterrupted run does (the plain single process's losses; the same samples at every step, each sample once per
epoch); states are atomic, pruned, checked against the model; ``onegpu export`` joins a state's shards.

The multi-process runs are tests/state_runs.py's loop in tests/scripts/train_state.py: states saved on 2 workers
(DDP, tensor parallel, pipeline, ZeRO-1) and on 4 (FSDP), loaded on 1, 2, 3 and 4 workers under other plans
(DDP, FSDP, ZeRO-1, optimizer offload, tensor parallel, pipeline).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_same_values, run_onegpu
from scenarios import Pairs, SkipNet
from state_runs import STEPS, train_state
from torch.utils.data import DataLoader

import onegpu
from onegpu.errors import UsageError
from onegpu.runtime import state_files

# name:scenario:plan:action (tests/scripts/train_state.py); each launch after the ones whose states it loads
ON_2 = ("ddp:skipnet:ddp2:save@2", "tp:gpt2-odd:tp2:save@5", "pp:hf:pp2:save@5", "zero1:skipnet:zero1-2:save@5",
        "drop:dropnet:ddp2:async@2", "drop-same:dropnet:ddp2:load=drop", "pp-dp2:hf:ddp2:load=pp",
        "gpt2-ddp:gpt2-odd:ddp2:save@5")  # fmt: skip
ON_4 = ("ddp-fsdp4:skipnet:fsdp4:load=ddp", "zero1-zero1-4:skipnet:zero1-4:load=zero1", "four:skipnet:fsdp4:save@5")
ON_3 = (
    "ddp-fsdp3:skipnet:fsdp3:load=ddp",
    "tp-fsdp3:gpt2-odd:fsdp3:load=tp",
    "zero1-offload3:skipnet:offload3:load=zero1",
)
THEN_ON_2 = (
    "four-zero1-2:skipnet:zero1-2:load=four",
    "gpt2-ddp-tp2:gpt2-odd:tp2:load=gpt2-ddp",
    "ddp-pp2:skipnet:pp2:load=ddp",
)
SCENARIO = {run.split(":")[0]: run.split(":")[1] for run in (*ON_2, *ON_4, *ON_3, *THEN_ON_2)}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every launch's report, by run name: each worker's ``{"start", "steps"}``."""
    import json

    states, reports = tmp_path_factory.mktemp("states"), {}
    for workers, runs in ((2, ON_2), (4, ON_4), (3, ON_3), (2, THEN_ON_2)):
        out = tmp_path_factory.mktemp(f"on{workers}")
        result = run_onegpu("run", "--workers", str(workers), "tests/scripts/train_state.py", str(out), str(states),
                            *runs, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        for name in (run.split(":")[0] for run in runs):
            reports[name] = [worker[name] for worker in json.loads((out / "results.json").read_text())]
        reports[f"stderr{workers}"] = reports.get(f"stderr{workers}", "") + result.stderr
    return {"reports": reports, "states": states}


@pytest.fixture(scope="module")
def plain():
    return {scenario: train_state(scenario)["steps"] for scenario in ("skipnet", "hf", "gpt2-odd")}


def _ids(workers: list[dict], step: int, *, replicas: int) -> list[int]:
    """The global batch's sample ids at ``step``: every replica's slice (the first ``replicas`` workers are one
    replica each under these plans: data parallelism alone, or none)."""
    return sorted(i for worker in workers[:replicas] for i in worker["steps"][str(step)][1])


LOADS = {  # run: (the run that saved, its replicas; this run's replicas)
    "pp-dp2": ("pp", 1, 2),
    "ddp-fsdp4": ("ddp", 2, 4),
    "zero1-zero1-4": ("zero1", 2, 4),
    "ddp-fsdp3": ("ddp", 2, 3),
    "tp-fsdp3": ("tp", 1, 3),
    "zero1-offload3": ("zero1", 2, 3),
    "four-zero1-2": ("four", 4, 2),
    "gpt2-ddp-tp2": ("gpt2-ddp", 2, 1),  # into tensor parallelism: a fused qkv and a vocabulary padded again
    "ddp-pp2": ("ddp", 2, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOADS))
def test_a_state_continues_under_another_plan_as_the_uninterrupted_run(launched, plain, name):
    reports, (saver, saved_replicas, replicas) = launched["reports"], LOADS[name]
    scenario, saved, resumed = SCENARIO[name], reports[saver], reports[name]
    stop = resumed[0]["start"] - 1
    assert sorted(map(int, resumed[0]["steps"])) == list(range(stop + 1, STEPS))
    losses = [resumed[0]["steps"][str(s)][0] for s in range(stop + 1, STEPS)]
    assert_same_values(losses, [plain[scenario][s][0] for s in range(stop + 1, STEPS)], what="resumed losses")
    seen = [_ids(saved, s, replicas=saved_replicas) for s in range(stop + 1)]
    seen += [_ids(resumed, s, replicas=replicas) for s in range(stop + 1, STEPS)]
    assert seen == [sorted(plain[scenario][s][1]) for s in range(STEPS)]  # the same samples at every step
    for epoch in range(2):  # each sample once per epoch, across the interruption
        assert sorted(i for step in seen[4 * epoch : 4 * epoch + 4] for i in step) == list(range(20))


@pytest.mark.slow
def test_saved_runs_train_as_the_plain_process_and_another_plan_is_said(launched, plain):
    reports = launched["reports"]
    for name in ("ddp", "tp", "pp", "zero1", "four"):
        losses = [reports[name][0]["steps"][str(s)][0] for s in range(STEPS)]
        assert_same_values(losses, [plain[SCENARIO[name]][s][0] for s in range(STEPS)], what=name)
    warning = re.compile(r"onegpu: resuming on 3 workers \(dp=3, sharding=parameters, fp32\) a state saved on 2 "
                         r"\(dp=1, tp=2, .*\): random numbers drawn inside the model \(dropout masks\) differ .*")  # fmt: skip
    assert any(warning.fullmatch(line) for line in reports["stderr3"].splitlines())


@pytest.mark.slow
def test_dropout_continues_exactly_on_the_same_plan(launched):
    """Random numbers drawn inside the model (dropout masks: per replica streams) are restored on the same plan;
    the state was saved asynchronously (committed once every worker's part was written)."""
    reports = launched["reports"]
    resumed, uninterrupted = reports["drop-same"][0], reports["drop"][0]
    assert resumed["start"] == 3
    steps = range(3, STEPS)
    assert_same_values([resumed["steps"][str(s)][0] for s in steps], [uninterrupted["steps"][str(s)][0] for s in steps])
    same = "onegpu: resuming on 2 workers (dp=2, sharding=none, fp32) a state saved on 2 (dp=2, sharding=none, fp32)"
    assert same not in reports["stderr2"]  # the same plan: nothing differs, nothing said


@pytest.mark.slow
def test_two_workers_to_one_and_export(launched, plain, tmp_path):
    """A state of 2 workers continues on one (this process); ``onegpu export`` of a tensor-parallel state (a fused
    qkv, a padded vocabulary) is the model one worker trains, loadable by from_pretrained."""
    states = launched["states"]
    resumed = train_state("skipnet", prepare=onegpu.prepare, directory=states / "ddp", resume=True)
    assert resumed["start"] == 3
    assert_same_values(
        [resumed["steps"][s][0] for s in range(3, STEPS)], [plain["skipnet"][s][0] for s in range(3, STEPS)]
    )
    train_state("gpt2-odd", prepare=onegpu.prepare, directory=tmp_path / "one", stop=5)
    from onegpu.cli.export import export

    export(states / "tp", tmp_path / "tp")  # the command's function, in this process (its CLI: tests/bad_input.py)
    export(tmp_path / "one" / "step-00000005", tmp_path / "ref")
    from transformers import GPT2LMHeadModel

    exported, reference = (GPT2LMHeadModel.from_pretrained(tmp_path / d) for d in ("tp", "ref"))
    from conftest import assert_same_parameters

    assert exported.lm_head.weight.shape[0] == 257
    assert_same_parameters(exported, reference)


# --- one worker, in this process ------------------------------------------------------------------------


def _skipnet(batch: int = 5, depth: int = 3):
    torch.manual_seed(0)
    model = SkipNet(depth=depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(Pairs(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    return onegpu.prepare(model, optimizer, loader)


def _steps(model, optimizer, loader, count: int) -> list[float]:
    losses = []
    for x, y in loader:
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if len(losses) == count:
            break
    return losses


def test_missing_or_empty_directory_loads_nothing(tmp_path):
    _skipnet()
    assert onegpu.load_state(tmp_path / "missing") is None
    assert onegpu.load_state(tmp_path) is None
    assert not (tmp_path / "missing").exists()


def test_states_are_kept_newest_k_and_a_half_written_one_is_skipped_with_a_warning(tmp_path, capsys):
    model, optimizer, loader = _skipnet()
    for step in range(4):
        _steps(model, optimizer, loader, 1)
        onegpu.save_state(tmp_path, step=step, keep=2, note=f"after {step}")
    assert [p.name for p in state_files.committed(tmp_path)] == ["step-00000002", "step-00000003"]
    half = tmp_path / "step-00000004"  # a save killed before its commit marker
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"cut short")
    capsys.readouterr()
    assert onegpu.load_state(tmp_path) == 4
    assert onegpu.saved_extra() == {"note": "after 3"}
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [
        f"onegpu: warning: step-00000004 in {tmp_path} was not completely saved (no COMMITTED marker): "
        "loading step-00000003 instead"
    ]
    onegpu.save_state(tmp_path, step=5, keep=2)  # a newer committed state: the half-written one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000005"]


def test_a_crash_mid_save_leaves_the_previous_state(tmp_path, monkeypatch):
    model, optimizer, loader = _skipnet()
    onegpu.save_state(tmp_path, step=0)
    import torch.distributed.checkpoint as dcp

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError):
        onegpu.save_state(tmp_path, step=1)
    assert [p.name for p in state_files.committed(tmp_path)] == ["step-00000000"]
    monkeypatch.undo()
    assert onegpu.load_state(tmp_path) == 1


def test_asynchronous_save_resumes_exactly(tmp_path):
    """Written while training goes on; committed once written; the load waits for it."""
    uninterrupted = train_state("skipnet", prepare=onegpu.prepare, directory=tmp_path, stop=2, asynchronous=True)
    resumed = train_state("skipnet", prepare=onegpu.prepare, directory=tmp_path, resume=True)
    assert (tmp_path / "step-00000002" / "COMMITTED").is_file()
    assert resumed["start"] == 3
    steps = range(3, STEPS)
    assert_same_values([resumed["steps"][s][0] for s in steps], [uninterrupted["steps"][s][0] for s in steps])
    assert [resumed["steps"][s][1] for s in steps] == [uninterrupted["steps"][s][1] for s in steps]


def test_a_loop_without_a_dataloader_resumes_exactly(tmp_path):
    """nanoGPT's loop draws its batches with torch.randint: the random state continues them; the model is split
    at its first call, so its tensors are read then."""
    from own_batches import GPT, GPTConfig, get_batch

    def run(stop: int | None, resume: bool) -> dict[int, float]:
        torch.manual_seed(1337)
        model = GPT(GPTConfig())
        optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95))
        model, optimizer = onegpu.prepare(model, optimizer)
        start = onegpu.load_state(tmp_path) if resume else None
        losses = {}
        for step in range(start or 0, 6):
            x, y = get_batch(4)
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[step] = loss.item()
            if step == stop:
                onegpu.save_state(tmp_path, step=step)
        return losses

    uninterrupted = run(stop=2, resume=False)
    resumed = run(stop=None, resume=True)
    assert sorted(resumed) == [3, 4, 5]
    assert_same_values([resumed[s] for s in resumed], [uninterrupted[s] for s in resumed])


@pytest.mark.parametrize(
    ("depth", "dim", "message"),
    [
        (4, 8, r".*this SkipNet: the state's parameter 'blocks\.3\.norm\.weight' is not in it .*"),
        (2, 8, r".*this SkipNet: its parameter 'blocks\.2\.norm\.weight' is not in the state .*"),
    ],
)
def test_a_state_of_another_model_names_the_first_parameter_that_differs(tmp_path, depth, dim, message):
    _skipnet(depth=depth)
    onegpu.save_state(tmp_path, step=0)
    _skipnet(depth=3)
    with pytest.raises(UsageError, match=message) as error:
        onegpu.load_state(tmp_path)
    assert "\n" not in str(error.value)


def test_a_parameter_of_another_shape_is_named_with_both_shapes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    onegpu.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    onegpu.save_state(tmp_path, step=0)
    other = torch.nn.Linear(4, 2)
    onegpu.prepare(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(UsageError, match=re.escape("its parameter 'weight' has shape (2, 4), the state's (3, 4)")):
        onegpu.load_state(tmp_path)


def test_another_global_batch_is_refused(tmp_path):
    _skipnet(batch=5)
    onegpu.save_state(tmp_path, step=0)
    _skipnet(batch=4)
    with pytest.raises(UsageError, match="saved with a global batch of 5 samples, DataLoader 0 has 4: keep the"):
        onegpu.load_state(tmp_path)


def test_an_unwritable_directory_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    _skipnet()
    with pytest.raises(UsageError, match=r".*/file is a file: give save_state and load_state a directory"):
        onegpu.load_state(tmp_path / "file" / "states")
    with pytest.raises(UsageError, match=r".*/file is a file: give save_state and load_state a directory"):
        onegpu.save_state(tmp_path / "file", step=0)


def test_a_save_at_a_step_boundary_counts_the_optimizers_steps(tmp_path):
    """What resizing a job uses: a save to the loop's state directory, the step from the optimizer's count."""
    from onegpu.runtime.state import save_at_step_boundary, state_directory

    model, optimizer, loader = _skipnet()
    _steps(model, optimizer, loader, 2)
    onegpu.save_state(tmp_path, step=1, keep=5, epoch=0)
    assert state_directory() == tmp_path
    _steps(model, optimizer, loader, 1)
    save_at_step_boundary()
    assert [p.name for p in state_files.committed(tmp_path)] == ["step-00000001", "step-00000002"]
    assert onegpu.load_state(tmp_path) == 3
    assert onegpu.saved_extra() == {"epoch": 0}


def test_a_stream_resumes_after_the_batches_it_gave(tmp_path):
    """A loader over an IterableDataset (no indices to draw again): its batches are read again and skipped."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (torch.tensor([float(i)]) for i in range(20))

    def run(resume: bool) -> list[list[float]]:
        model = torch.nn.Linear(1, 1)
        model, optimizer, loader = onegpu.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                  DataLoader(Stream(), batch_size=5))  # fmt: skip
        start = onegpu.load_state(tmp_path) if resume else None
        seen = []
        for step, batch in enumerate(loader, start=start or 0):
            seen.append(batch.view(-1).tolist())
            if step == 1 and not resume:
                onegpu.save_state(tmp_path, step=step)
        return seen

    first, resumed = run(resume=False), run(resume=True)
    assert resumed == first[2:] == [[10.0, 11.0, 12.0, 13.0, 14.0], [15.0, 16.0, 17.0, 18.0, 19.0]]
