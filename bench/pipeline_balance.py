"""Stage balance of a Llama with a large vocabulary: cuts from the planner's FLOPs vs equal block counts.

    python bench/pipeline_balance.py

Each stage is built as a worker builds it (its blocks, the parameters it uses, the rest shape-only)
and its forward+backward on one micro-batch is timed in this one process, one thread, so stages
do not compete for cores. Reported per split: each stage's time, and slowest / mean stage time
(1.00 is perfect balance; the pipeline runs at the pace of its slowest stage).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onegpu.parallel import pipeline as pp
from onegpu.planner.inspection import describe
from onegpu.planner.stages import flops_cuts

CONFIG = LlamaConfig(
    vocab_size=32000,  # embedding and head: 2 x 8.2M parameters, as much as 4 of the 8 blocks
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
BATCH, SEQ, REPEATS = 2, 128, 5


def stage_seconds(bounds: list[int], index: int, inputs: dict) -> float:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    layout = pp.BlockLayout(model, path="model.layers")
    held = set(range(bounds[index], bounds[index + 1]))
    layout.hold_only(held)
    outside = describe(model, sample={k: v[:1] for k, v in inputs.items()}, seq_len=SEQ).stage_layout(bounds[1:-1])
    used = {n for n, stages in outside.outside if index in stages}
    used |= {n for n, _ in model.named_parameters() if n.startswith("model.layers.")}  # the held blocks' own
    pp.keep_only(model, used, device=torch.device("cpu"))
    stage = pp.BlockRangeStage(layout, start=bounds[index], end=bounds[index + 1], held=held)
    times = []
    for _ in range(REPEATS + 2):
        received = () if stage.first else (torch.randn(BATCH, SEQ, CONFIG.hidden_size, requires_grad=True),)
        start = time.perf_counter()
        output = stage(*received, **inputs)
        if stage.last:
            output.backward()
        else:
            output.backward(torch.ones_like(output))
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def report(name: str, cuts: list[int], inputs: dict) -> None:
    bounds = [0, *cuts, CONFIG.num_hidden_layers]
    seconds = [stage_seconds(bounds, i, inputs) for i in range(len(bounds) - 1)]
    blocks = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    stages = "  ".join(f"{b} blocks {s * 1e3:6.1f} ms" for b, s in zip(blocks, seconds))
    print(f"  {name:22} {max(seconds) / statistics.mean(seconds):5.2f}   {stages}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    print(f"Llama, {CONFIG.num_hidden_layers} blocks, vocabulary {CONFIG.vocab_size}, micro-batch {BATCH} x {SEQ}")
    for stages in (2, 4):
        print(f"{stages} stages: {'split':22} slowest/mean   per stage (forward + backward)")
        one = {k: v[:1] for k, v in inputs.items()}
        profile = describe(LlamaForCausalLM(CONFIG), sample=one, seq_len=SEQ).profile
        report("planner FLOPs", flops_cuts(profile, stages=stages), inputs)
        even = CONFIG.num_hidden_layers // stages
        report("equal block counts", [even * i for i in range(1, stages)], inputs)


if __name__ == "__main__":
    main()
