"""The planner's analysis works for every causal LM of the installed transformers, and models whose layers
differ (sliding and full attention, dense and mixture-of-experts layers) are measured as if whole."""

import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Gemma3TextConfig, Qwen2Config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from onegpu.errors import UsageError
from onegpu.planner.analysis import analyze
from onegpu.planner.layer_kinds import layer_count
from onegpu.planner.meta_kernels import META_FLASH, register_meta_flash

SEQ = 8
SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def on_meta(config, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fewer_layers(config_class):
    """The config class's default, with at most six layers where its constructor takes a layer count."""
    config = config_class()
    count = layer_count(config)
    if count and count > 6 and hasattr(config, "num_hidden_layers"):
        try:
            return config_class(num_hidden_layers=6)
        except Exception:  # noqa: BLE001 - per-layer defaults of a fixed length: keep the default depth
            pass
    return config


def runs_on_meta(model: torch.nn.Module) -> bool:
    """Whether the model trains a step on the meta device at all, outside onegpu."""
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        return True
    except Exception:  # noqa: BLE001 - data-dependent control flow (.item(), nonzero) and broken defaults
        return False


def verdicts(model_types: list[str]) -> tuple[list, list, list, list]:
    """The config class of each model type analysed: (analysed, no_build, no_run, wrong)."""
    warnings.filterwarnings("ignore")
    analysed, no_build, no_run, wrong = [], [], [], []
    for model_type in model_types:
        config_class = CONFIG_MAPPING[model_type]
        name = config_class.__name__
        try:
            config = fewer_layers(config_class)
            model = on_meta(config)
        except Exception:  # noqa: BLE001 - no default config, or no build on meta even outside onegpu
            no_build.append(name)
            continue
        try:
            profile = analyze(config, seq_len=SEQ)
        except UsageError as error:
            (wrong if runs_on_meta(model) else no_run).append(f"{name}: {error}")
            continue
        if profile.params != unique_parameters(model):
            wrong.append(f"{name}: {profile.params} parameters, the model has {unique_parameters(model)}")
        analysed.append(name)
    return analysed, no_build, no_run, wrong


@pytest.mark.slow
def test_every_causal_lm_that_runs_on_meta_is_analysed_with_its_exact_parameter_count():
    known = sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING)
    config_classes = {CONFIG_MAPPING[t]: t for t in reversed(known)}  # each class once, by its first model type
    types = [config_classes[c] for c in sorted(config_classes, key=lambda c: c.__name__)]
    # every class, half in each of two processes: the inspection of ~200 models is CPU-bound
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        halves = list(pool.map(verdicts, [types[0::2], types[1::2]]))
    analysed, no_build, no_run, wrong = ([*a, *b] for a, b in zip(*halves))
    print(
        f"{len(analysed)} of {len(config_classes)} causal-LM config classes analysed; {len(no_build)} do not build "
        f"on meta ({', '.join(no_build)}); {len(no_run)} do not train on meta outside onegpu either"
    )
    assert len(analysed) + len(no_build) + len(no_run) + len(wrong) == len(config_classes)
    assert not wrong, wrong
    assert len(analysed) >= 0.75 * len(config_classes), (no_build, no_run)


def measured_whole(config) -> object:
    """Every layer of the model measured, as the plain-module analysis does."""
    register_meta_flash()
    config._attn_implementation = META_FLASH
    model = on_meta(config, attn_implementation=META_FLASH)
    ids = torch.zeros(1, SEQ * 4, dtype=torch.long, device="meta")
    return analyze(model, seq_len=SEQ * 4, sample={"input_ids": ids, "labels": ids})


@pytest.mark.parametrize(
    "config",
    [
        # the model: transformers derives layer_types from num_hidden_layers, sliding from the fourth layer
        Qwen2Config(**SMALL, num_hidden_layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=3),
        Gemma3TextConfig(**SMALL, num_hidden_layers=13, sliding_window=8),  # five sliding layers, then a full one
        DeepseekV3Config(  # dense layers, then mixture-of-experts ones
            **SMALL,
            num_hidden_layers=5,
            first_k_dense_replace=2,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
        ),
    ],
    ids=["qwen2-sliding-from-layer-3", "gemma3-five-sliding-one-full", "deepseek-dense-then-experts"],
)
def test_layers_of_different_kinds_cost_what_they_cost_when_measured_whole(config):
    profile, whole = analyze(config, seq_len=SEQ * 4), measured_whole(config)
    assert [b.params for b in profile.blocks] == [b.params for b in whole.blocks]
    assert [b.fwd_flops for b in profile.blocks] == [b.fwd_flops for b in whole.blocks]
    assert [b.activation_bytes for b in profile.blocks] == [b.activation_bytes for b in whole.blocks]
    assert profile.params == whole.params and profile.flops_per_sample == pytest.approx(whole.flops_per_sample)
    assert len({b.fwd_flops for b in profile.blocks}) == 2  # the two kinds differ, and both were measured
