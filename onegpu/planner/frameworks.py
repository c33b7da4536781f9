"""What a training framework overlaps: the runtime behaviour the GPU time model needs beyond the plan.

onegpu's own runtime (``ONEGPU``) is what the planner costs. The others describe the frameworks of
published runs (bench/published_runs.yaml), so that those runs can be costed as they ran: the same
plan runs slower in a framework that reduces gradients only after backward. Each figure cites where
the framework's behaviour is stated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Framework:
    """How a framework schedules communication against compute.

    ``overlap_gradient_reduction``: data-parallel gradients are reduced in buckets during backward
    (PyTorch DDP, FSDP, Megatron-Core ``--overlap-grad-reduce``), not all at once after it.
    ``overlap_tensor_parallel``: tensor-parallel collectives run under the GEMMs that produce or consume
    them (Transformer Engine userbuffers ``--tp-comm-overlap``, PyTorch async TP).
    ``gathers_per_block``: collectives that gather (and reduce-scatter) one sharded block: 1 for a flat
    parameter per block (FSDP), one per leaf module for per-module hooks (DeepSpeed ZeRO-3); each pays
    its own ring latency.
    ``flash_attention``: attention is one fused kernel (FlashAttention, PyTorch SDPA), not GEMMs around a
    materialised softmax. ``hopper_attention``: on Hopper, that kernel is a Hopper-specific one (FA3, cuDNN).
    ``fused_elementwise``: norms, activations, rotary embeddings and residual adds run as fused kernels
    (Megatron's and Transformer Engine's, or torch.compile's), not op by op as eager PyTorch runs them.
    ``prefetch_gathers``: whether a sharded block's parameters are gathered ahead, under the previous
    block's compute (FSDP's forward/backward prefetch), or when the block is reached.
    """

    name: str
    overlap_gradient_reduction: bool = True
    overlap_tensor_parallel: bool = False
    gathers_per_block: int = 1
    prefetch_gathers: bool = True
    flash_attention: bool = True
    hopper_attention: bool = False
    fused_elementwise: bool = False


# onegpu's runtime: DDP's bucketed all-reduce and FSDP2's prefetched per-block all-gathers run during
# backward/forward; its tensor parallelism is plain DTensor (collectives between the GEMMs); the model runs
# eagerly (a compiled plan's measured speed-up is applied on top, Workload.compiled_block_time).
ONEGPU = Framework(name="onegpu")

# Megatron-LM as of Narayanan et al. 2021 and Korthikanti et al. 2022: the data-parallel all-reduce runs
# after the whole backward (Korthikanti et al. 2022, sec. 6.3: "we do not overlap the gradient all-reduce
# with back-propagation"); tensor-parallel all-reduces between the GEMMs (Shoeybi et al. 2019, fig. 3);
# attention as two batched GEMMs around a fused scale-mask-softmax kernel (Narayanan et al. 2021, sec. 4.2),
# before FlashAttention (Dao et al., May 2022); fused bias+GeLU, bias+dropout+add and LayerNorm kernels
# (Narayanan et al. 2021, sec. 4.2).
MEGATRON_2021 = Framework(
    name="megatron-lm-2021", overlap_gradient_reduction=False, flash_attention=False, fused_elementwise=True
)

# Megatron-Core, July 2024 (NVIDIA/Megatron-LM README @f2e5db402c, "Training Speed and Scalability"):
# "--overlap-grad-reduce --overlap-param-gather --tp-comm-overlap"; attention by Transformer Engine's
# cuDNN fused attention, Hopper-specific on H100.
MEGATRON_CORE_2024 = Framework(
    name="megatron-core-2024", overlap_tensor_parallel=True, hopper_attention=True, fused_elementwise=True
)

# DeepSpeed ZeRO-3 inside Megatron-LM (Narayanan et al. 2021, table 2): parameters are fetched by
# per-module forward/backward hooks (Rajbhandari et al. 2021, ZeRO-Infinity, sec. 6-7), so a GPT block's
# six leaf modules (four Linear, two LayerNorm) are six all-gathers, prefetched ahead of use; as in
# Megatron-LM of the time (whose fused kernels it runs), gradients are reduced after backward and attention is
# not a flash kernel.
DEEPSPEED_ZERO3_2021 = Framework(
    name="deepspeed-zero3-2021",
    overlap_gradient_reduction=False,
    gathers_per_block=6,
    flash_attention=False,
    fused_elementwise=True,
)

# torchtitan (FSDP2 prefetch, vanilla TP, PyTorch SDPA's FlashAttention-2 backend) and llm-foundry (PyTorch
# FSDP with BACKWARD_PRE prefetch, flash-attn 2): as onegpu.
TORCHTITAN = Framework(name="torchtitan")
# torchtitan with torch.compile (--training.compile): each block's elementwise ops fused by Inductor.
TORCHTITAN_COMPILED = Framework(name="torchtitan-compiled", fused_elementwise=True)
LLM_FOUNDRY = Framework(name="llm-foundry", fused_elementwise=True)

# Meta's Llama 3 training stack (Llama 3 paper, sec. 3.3.2): FSDP with parameters kept after forward, TP
# collectives not stated to be overlapped; assumed: fused elementwise kernels, as any production stack at that
# scale (not stated).
LLAMA3_META = Framework(name="llama3-meta", fused_elementwise=True)

FRAMEWORKS = {
    f.name: f
    for f in (
        ONEGPU,
        MEGATRON_2021,
        MEGATRON_CORE_2024,
        DEEPSPEED_ZERO3_2021,
        TORCHTITAN,
        TORCHTITAN_COMPILED,
        LLM_FOUNDRY,
        LLAMA3_META,
    )
}
