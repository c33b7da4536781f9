"""What a CPU worker holds besides the plan's tensors: the resident set of a process that imported torch,
transformers and onegpu and joined a gloo process group, and what torch.compile (inductor) adds once it has
compiled a block. The figures behind memory_model.CPU_RUNTIME_BYTES and CPU_COMPILE_BYTES.

    python bench/local_runtime_bytes.py
"""

from __future__ import annotations

import json
import os
import resource


def resident() -> int:
    """This process's resident set now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import onegpu.api  # noqa: F401  (what prepare imports)
    import onegpu.runtime.execute  # noqa: F401

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    runtime = resident()
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    )
    block = model.model.layers[0]
    block.forward = torch.compile(block.forward, fullgraph=True)
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    compiled = resident()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"runtime_bytes": runtime, "compile_bytes": compiled - runtime, "peak_bytes": peak}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
