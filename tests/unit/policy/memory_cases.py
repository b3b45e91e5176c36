"""Shapes and specs the memory-planner tests share: a Llama-3-8B-shaped base and a tiny one."""
from __future__ import annotations

from typing import Any

from cpt_api.spec import CptRunSpec
from cpt_operator.policy.model_shape import ModelShape

# Llama-3-8B's config.json, as published
LLAMA3_8B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                    "vocab_size": 128256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
LLAMA3_8B = ModelShape.from_hf_config(LLAMA3_8B_CONFIG)
TINY = ModelShape(hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, intermediate=688, vocab=4096,
                  tied=False)


def _merge(doc: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        doc[key] = _merge(doc.get(key, {}), value) if isinstance(value, dict) else value
    return doc


def spec(**sections: Any) -> CptRunSpec:
    """One node of 8 GPUs, seqLen 4096, micro-batch 1, ddp; `sections` merge into the spec."""
    doc = {"baseModel": {"uri": "s3://models/llama-3-8b"},
           "data": {"sources": [{"name": "legal", "role": "domain", "uri": "s3://d/legal"},
                                {"name": "web", "role": "replay", "uri": "s3://d/web"}]},
           "budget": {"steps": 1000}, "packing": {"seqLen": 4096},
           "training": {"microBatchSize": 1, "parallelism": {"strategy": "ddp"}},
           "resources": {"nodes": 1, "gpusPerNode": 8, "gpuMemory": "80Gi"}}
    return CptRunSpec.model_validate(_merge(doc, sections))
