"""Run under torchrun: build a model on the meta device, shard it with FSDP2, fill each rank's
slices from an HF safetensors directory (`load/`), give it tokenizer-extension rows (a collective
mean over pieces held by other ranks), and build the frozen bf16 reference the same way. Rank 0
compares everything, gathered, with the whole model transformers loads in one process.

    torchrun --nproc-per-node N tests/integration/sharded_load_check.py BASE_DIR OUT.json
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from cpt_api.spec import ParallelismSpec, Sharding
from cpt_trainer import distributed
from cpt_trainer.extension.rows import fill_rows, grow, grown_names, mean_init
from cpt_trainer.extension.tokenizer import NewToken
from cpt_trainer.load.fill import fill
from cpt_trainer.load.safetensors import Index
from cpt_trainer.model import skeleton
from cpt_trainer.parallel import parallelize, shard_frozen

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def new_tokens(vocab: int) -> list[NewToken]:
    """Rows past the vocabulary whose pieces are spread over the whole vocabulary (so over the
    ranks), one of them a single piece."""
    pieces = [(1, vocab - 1), (vocab // 2, 3, vocab - 2), (vocab // 3,), (0, vocab // 4, vocab // 2 + 1)]
    return [NewToken(f"t{i}", f"t{i}", vocab + i, p) for i, p in enumerate(pieces)]


def main(base: str, out: str) -> None:
    info = distributed.setup(use_cuda=False, timeout=timedelta(seconds=30))
    model = skeleton(base)
    tokens = new_tokens(model.config.vocab_size)
    grow(model, tokens)
    parallel = parallelize(model, ParallelismSpec(strategy=Sharding.fsdp), info,
                           procs_per_node=info.world_size, compute_dtype=None)
    index = Index(base)
    fill(model, index, grown_names(model))
    fill_rows(model, tokens)
    trained = get_model_state_dict(model, options=FULL)

    reference = shard_frozen(skeleton(base, dtype=torch.bfloat16), parallel, info, torch.bfloat16)
    ref_index = Index(base)
    fill(reference, ref_index)
    frozen = get_model_state_dict(reference, options=FULL)
    read = [None] * info.world_size
    dist.all_gather_object(read, (index.bytes_read, ref_index.bytes_read))
    if info.is_main:
        whole = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        whole_ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        mean_init(whole, tokens)
        stored = sum(s.end - s.start for s in index.tensors.values())
        with open(out, "w") as f:
            json.dump({"world_size": info.world_size, "stored_bytes": stored, "bytes_read": read,
                       "sharded": all(p.to_local().numel() < p.numel() for p in model.parameters()),
                       "trained_mismatches": _mismatches(trained, whole.state_dict()),
                       "reference_mismatches": _mismatches(frozen, whole_ref.state_dict()),
                       "reference_dtype": str(next(reference.parameters()).dtype)}, f)
    dist.barrier()
    distributed.teardown()


def _mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in want.keys() | got.keys()
                  if k not in got or k not in want or not torch.equal(got[k], want[k]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
