"""Run under torchrun: load a checkpoint into an FSDP model and optimizer on this world size
with the trainer's own code (each rank reads its slices through the verified block reader), and
compare every tensor, gathered, with the files read whole; report the bytes each rank read.

    torchrun --nproc-per-node N tests/integration/reshard_check.py CHECKPOINT_DIR OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

from cpt_api.manifest import MODEL_DIR, OPTIMIZER_DIR
from cpt_api.spec import ParallelismSpec, Sharding
from cpt_trainer import distributed
from cpt_trainer.checkpoint import read_manifest
from cpt_trainer.checkpointer import Checkpointer
from cpt_trainer.load.verified import CheckpointSource, open_blocks
from cpt_trainer.model import skeleton
from cpt_trainer.parallel import parallelize

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)


def whole(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory, read in full by this one process."""
    meta = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    return state


def mismatches(loaded: dict[str, object], saved: dict[str, torch.Tensor]) -> list[str]:
    bad = [k for k, v in saved.items() if not (isinstance(loaded.get(k), torch.Tensor)
                                                and torch.equal(loaded[k], v))]  # type: ignore[arg-type]
    return bad


def main(directory: str, out: str) -> None:
    info = distributed.setup(use_cuda=False)
    model = skeleton(directory)
    parallel = parallelize(model, ParallelismSpec(strategy=Sharding.fsdp), info,
                           procs_per_node=info.world_size, compute_dtype=None)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.ndim >= 2]},
         {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}])
    checkpointer = Checkpointer(f"{out}.unused", info, keep=1)
    source = CheckpointSource(directory, directory, open_blocks(directory, read_manifest(directory)))
    checkpointer.load_model(parallel.model, source)
    checkpointer.load_optimizer(parallel.model, optimizer, source)
    read = [0] * info.world_size
    dist.all_gather_object(read, source.bytes_read)
    sharded = any(p.to_local().numel() < p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if info.is_main:
        saved_model, saved_optim = whole(f"{directory}/{MODEL_DIR}"), whole(f"{directory}/{OPTIMIZER_DIR}")
        with open(out, "w") as f:
            json.dump({"world_size": info.world_size, "sharded": sharded,
                       "model_tensors": len(saved_model), "optimizer_tensors": len(saved_optim),
                       "bytes_read": read,
                       "model_mismatches": mismatches(model_sd, saved_model),
                       "optimizer_mismatches": mismatches(optim_sd, saved_optim)}, f)
    checkpointer.close()
    dist.barrier()
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
