"""torch.compile per repeated block (``Plan.compile``): a compiled plan trains like a plain eager process.

Inductor's CPU kernels (fused, vectorised) change fp32 rounding no more than another reduction order does,
so the one tolerance policy of conftest.py holds unchanged.
"""

import pytest
import torch
from conftest import assert_same_training, launch_script
from scenarios import train
from test_single_device_equivalence import load_checkpoint

from onegpu.parallel.compile import CompiledForward, apply_compile
from onegpu.plan import Plan


def compiled_blocks(model: torch.nn.Module) -> int:
    return sum(isinstance(m.__dict__.get("forward"), CompiledForward) for m in model.modules())


@pytest.mark.parametrize("scenario", ["hf", "custom"])
def test_one_worker_with_compiled_blocks_trains_like_plain_eager_pytorch(scenario):
    import onegpu

    run = train(scenario, prepare=onegpu.prepare, plan=Plan(dp=1, compile=True))
    assert compiled_blocks(run["model"]) == (2 if scenario == "hf" else 3)
    assert_same_training(run, train(scenario), trained=run["model"])


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    return launch_script(tmp_path_factory, "train_compiled.py", workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["hf", "custom"])  # replicated, and sharded (FSDP2 around the compiled blocks)
def test_two_workers_with_compiled_blocks_train_like_plain_eager_pytorch(compiled_runs, scenario):
    out, results = compiled_runs
    assert results[scenario].pop("compiled") == (2 if scenario == "hf" else 3)
    assert_same_training(results[scenario], train(scenario), trained=load_checkpoint(scenario, out / scenario))


def test_a_block_dynamo_cannot_capture_whole_is_compiled_with_graph_breaks():
    class Chatty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            torch._dynamo.graph_break()  # what an unsupported call (a C extension, a data-dependent branch) causes
            return self.fc(x) * 2

    block, plain = Chatty(), Chatty()
    plain.load_state_dict(block.state_dict())
    apply_compile([block])
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"Chatty cannot be compiled as one graph .*compiling it with graph breaks"):
        out = block(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    assert not block.forward.fullgraph
