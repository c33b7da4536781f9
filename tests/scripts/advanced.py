"""Advanced Parallelization inside prepare(): the planner's choice runs, and is what the budget allows."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import PaddedTokens, checkpointed_blocks  # noqa: E402

import onegpu  # noqa: E402
from onegpu.errors import UsageError  # noqa: E402


def train(budget_gb: float, **pins) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(PaddedTokens(vocab=2048, samples=32, seq=32), batch_size=8)
    onegpu.enable_advanced_parallelization(**pins)
    try:
        model, optimizer, loader = onegpu.prepare(model, optimizer, loader, memory_budget_gb=budget_gb)
    except UsageError as error:
        return {"error": str(error)}
    finally:
        onegpu.disable_advanced_parallelization()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    plan = model.onegpu_plan
    return {
        "plan": plan.config_dict(),
        "reason": plan.reason,
        "losses": losses,
        "checkpointed": checkpointed_blocks(model),
        "predicted_bytes": plan.predicted.memory_per_device_bytes,
    }


results = {
    "generous": train(8.0),
    "tight": train(0.70),
    "pinned": train(8.0, activation_checkpointing="full", sharding="parameters"),
    "impossible": train(0.05),
    "pipeline": train(8.0, num_stages=2, num_micro_batches=4, schedule="1f1b"),
    "tensor": train(8.0, tp=2),
}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, results)
if onegpu.is_main_process():
    Path(sys.argv[1]).write_text(json.dumps(gathered))
