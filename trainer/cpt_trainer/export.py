"""`cptctl export`: one checkpoint as a Hugging Face model directory for serving.

Out comes what `AutoModelForCausalLM.from_pretrained(DIR)` and any HF-format server load:
`model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
past `--max-shard-size`, 5GB by default), `config.json`, `generation_config.json` when the
checkpoint has one, and the tokenizer files, all as the checkpoint holds them (config.json
keeps `cpt_tokenizer_extension`; tied embeddings are stored once and stay tied on load).

How, and what memory it needs. The architecture is built on the meta device (`model.skeleton`:
no memory); transformers' own save-time helpers decide which names are stored (tied aliases
dropped: `remove_tied_weights_from_state_dict`) and how they fall into shards
(`split_torch_state_dict_into_shards`). Then, one output shard at a time, exactly those tensors
are read from the DCP `model/` directory (`dcp.load` of a partial state dict reads only their
byte ranges, whatever world size wrote them), put back into the original checkpoint layout
(`revert_weight_conversion`, per shard, as transformers does for offloaded models) and written
with safetensors. Peak memory is one output shard (at most `--max-shard-size`, or the largest
single tensor when that is bigger) in the dtype the trainer stored, plus the small skeleton:
a 70B model exports on a machine with a few GB of free memory.

Safety. The manifest is verified first (every file the export reads is re-hashed; a remote
checkpoint is fetched into the per-node cache and verified there): a corrupt checkpoint is
refused with the file named. The checkpoint is only read. The directory is written beside DIR
under a temporary name and renamed at the end, so a failed export never looks like a model;
a non-empty DIR is refused unless `--force`, which replaces it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from cpt_api.manifest import ATTEMPT_PREFIX, MODEL_DIR, is_model_file

from . import checkpoint
from .errors import Refused

DEFAULT_SHARD_SIZE = "5GB"
WEIGHTS = "model{suffix}.safetensors"
INDEX = "model.safetensors.index.json"


def write_weights(directory: str, out: str, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
    """Consolidated safetensors of a verified local checkpoint `directory` into `out`."""
    import torch
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .model import skeleton

    model = skeleton(directory)
    kept = remove_tied_weights_from_state_dict(model.state_dict(), model)
    # torch.distributed.checkpoint re-exports FileSystemReader without __all__ (no explicit export)
    stored = dcp.FileSystemReader(  # type: ignore[attr-defined]
        os.path.join(directory, MODEL_DIR)).read_metadata().state_dict_metadata
    if missing := sorted(set(kept) - set(stored)):
        raise Refused(f"{directory}/{MODEL_DIR} lacks {', '.join(missing[:5])}: it does not hold "
                      "the model its config.json describes")
    # Shapes and dtypes as stored (no memory): what the shards will hold.
    empty = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype,  # type: ignore[union-attr]
                            device="meta") for k in kept}
    split = split_torch_state_dict_into_shards(empty, filename_pattern=WEIGHTS,
                                               max_shard_size=max_shard_size)
    weight_map: dict[str, str] = {}
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: torch.empty_like(empty[k], device="cpu") for k in keys}
        # torch.distributed.checkpoint re-exports load without __all__ (no explicit export)
        dcp.load(shard, checkpoint_id=os.path.join(directory, MODEL_DIR), no_dist=True)  # type: ignore[attr-defined]
        shard = revert_weight_conversion(model, shard)
        save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(out, filename),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        del shard  # the next shard reuses the memory
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": model.num_parameters()},
                 "weight_map": dict(sorted(weight_map.items()))}
        Path(out, INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_model_files(directory: str, files: list[str], out: str) -> None:
    """config.json (with the KV cache back on: training turns it off, serving wants it),
    generation_config.json and the tokenizer files, byte for byte otherwise."""
    for rel in files:
        if rel == "config.json":
            config = json.loads(Path(directory, rel).read_text())
            config["use_cache"] = True
            Path(out, rel).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(os.path.join(directory, rel), os.path.join(out, rel))


def latest_under(root: str) -> str:
    """The newest checkpoint under a local run's checkpoint root (`attempt-NNN/step-XXXXXXXX`,
    by attempt then step) whose manifest lists files that are all there; `export` then
    re-hashes what it reads."""
    for attempt in sorted(Path(root).glob(f"{ATTEMPT_PREFIX}*"), reverse=True):
        valid, _ = checkpoint.list_checkpoints(str(attempt), deep=False)
        if valid:
            return str(attempt / valid[-1][0])
    raise Refused(f"no valid checkpoint under {root}")


def _check_target(out: Path, source: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise Refused(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise Refused(f"{out} is not empty (use --force to replace it)")
    if checkpoint.is_local(source):
        ckpt = Path(checkpoint.local_path(source)).resolve()
        target = out.resolve()
        if target == ckpt or ckpt in target.parents or target in ckpt.parents:
            raise Refused(f"{out} overlaps the checkpoint {source}: an export never writes into "
                          "a checkpoint, and --force would delete it")


def export(source: str, to: str, *, force: bool = False,
           max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> int:
    """Export checkpoint `source` (a path or fsspec URI) to the local directory `to`; returns
    its step."""
    out = Path(to)
    _check_target(out, source, force)
    problems = checkpoint.fetch(source, (MODEL_DIR,))
    if problems:
        raise Refused(f"checkpoint {source} is not usable: {'; '.join(problems)}")
    manifest, directory = checkpoint.read_manifest(source), checkpoint.local_path(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent)
    try:
        write_weights(directory, staging, max_shard_size)
        copy_model_files(directory, sorted(f for f in manifest.files if is_model_file(f)), staging)
        _readable(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest.step


def _readable(directory: str) -> None:
    """Ordinary permissions (umask) for what mkdtemp and safetensors create private, so that a
    server running as another user can read the export."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cptctl export", description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("checkpoint", nargs="?", help="checkpoint directory or URI (s3://.../step-…)")
    what.add_argument("--latest-under", help="a run's checkpoint root: export its newest valid one")
    p.add_argument("--to", required=True, help="output directory (local)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help="safetensors shard size (default 5GB)")
    p.add_argument("--why", default="", help="how the checkpoint was chosen (printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .diagnose import quiet_transformers

    quiet_transformers()
    # One process reading a checkpoint without a process group is what we mean to do.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        source = args.checkpoint or latest_under(args.latest_under)
        step = export(source, args.to, force=args.force, max_shard_size=args.max_shard_size)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    why = args.why or ("latest valid" if args.latest_under else "")
    print(f"exported {source}{f' ({why})' if why else ''}, step {step}, to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
