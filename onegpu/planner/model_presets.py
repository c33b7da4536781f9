"""Hugging Face configs of well-known models, so plans can be made without downloading anything.

Values are those of each model's published ``config.json`` on the Hugging Face Hub.
"""

from __future__ import annotations

from typing import Any

LLAMA_BASE = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": {
        **LLAMA_BASE,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # meta-llama/Meta-Llama-3-70B config.json
    "llama3-70b": {
        **LLAMA_BASE,
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # meta-llama/Llama-3.1-405B config.json
    "llama3-405b": {
        **LLAMA_BASE,
        "vocab_size": 128256,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
    },
    # meta-llama/Llama-2-13b-hf config.json
    "llama2-13b": {
        **LLAMA_BASE,
        "vocab_size": 32000,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "max_position_embeddings": 4096,
    },
    # openai-community/gpt2 config.json
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
    },
    # openai-community/gpt2-xl config.json
    "gpt2-xl": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 1600,
        "n_layer": 48,
        "n_head": 25,
        "n_positions": 1024,
    },
    # A 1T-parameter dense Llama-style model (the shape of Megatron-LM's 1T GPT, Narayanan et al. 2021, Table 1),
    # for planning at the largest scale.
    "llama-1t": {
        **LLAMA_BASE,
        "vocab_size": 51200,
        "hidden_size": 25600,
        "intermediate_size": 68352,
        "num_hidden_layers": 128,
        "num_attention_heads": 160,
        "num_key_value_heads": 160,
        "max_position_embeddings": 4096,
    },
}
