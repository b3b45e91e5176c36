"""`cptctl`: validate, run locally, inspect and steer CptRuns.

Entry points stay thin: parse arguments, call one module, turn its errors into exit codes.
Commands that need torch (diagnose, tokenizer, export) run the trainer package in a subprocess, so this
package never imports torch.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol, TypeAlias

from cpt_api import InvalidSpec, load_run


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.file)
    except InvalidSpec as exc:
        print(f"{args.file}: {len(exc.errors)} error(s)", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: CptRun {run.metadata.name!r} is valid")
    from .policy.recipes import recipe_warnings

    for warning in recipe_warnings(run.spec):
        print(f"  warning: {warning}")
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from cpt_operator.crd import crd_yaml

    text = crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """0: fits (or no memory to check), 1: does not fit (the smallest fix named), 2: no plan."""
    from .base_shape import ShapeUnavailable, read_shape
    from .planning import plan_lines, refusal, resized

    try:
        spec = resized(load_run(args.file).spec, args.nodes, args.gpus_per_node, args.gpu_memory,
                       memory=args.memory)
        shape = read_shape(spec.base_model)
        lines, problem = plan_lines(spec, shape), refusal(spec, shape)
    except (InvalidSpec, OSError, ShapeUnavailable, ValueError) as exc:
        print(f"{args.file}: cannot plan: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if problem:
        print(problem, file=sys.stderr)
    return 1 if problem else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .local.runner import run_local

    return run_local(args.file, run_dir=args.run_dir, nproc=args.nproc, fresh=args.fresh,
                     progress=not args.no_progress)


class RunBackend(Protocol):
    """What the commands that look at or steer a run ask of the backend it lives on
    (`local.commands.LocalCommands`, `kube.commands.ClusterCommands`)."""

    def show_status(self, as_json: bool = False) -> int: ...

    def request_stop(self) -> int: ...

    def request_resume(self) -> int: ...

    def request_rollback(self, to: str) -> int: ...


def _backend(args: argparse.Namespace) -> RunBackend:
    """A cluster run when asked for one, or when there is no local run directory of that name."""
    if not (args.namespace or args.kubeconfig):
        from .local.commands import LocalCommands
        from .local.rundir import RunDir

        try:
            RunDir.find(args.run)
            return LocalCommands(args.run)
        except FileNotFoundError:
            pass
    from .kube.commands import ClusterCommands

    return ClusterCommands(args.run, namespace=args.namespace, kubeconfig=args.kubeconfig)


def cmd_status(args: argparse.Namespace) -> int:
    return _backend(args).show_status(as_json=args.json)


def cmd_stop(args: argparse.Namespace) -> int:
    return _backend(args).request_stop()


def cmd_resume(args: argparse.Namespace) -> int:
    return _backend(args).request_resume()


def cmd_rollback(args: argparse.Namespace) -> int:
    return _backend(args).request_rollback(args.to)


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="the CptRun's namespace on a cluster (default: the context's)")
    p.add_argument("--kubeconfig", help="kubeconfig of the cluster (default: $KUBECONFIG, ~/.kube/config)")


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from .local.commands import show_checkpoints

    return show_checkpoints(args.run, plot=args.plot, as_json=args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from .local.commands import export_source

    try:
        source = export_source(args.run, args.checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _trainer_tool("cpt_trainer.export", [*source, "--to", args.to,
                                                "--max-shard-size", args.max_shard_size,
                                                *(["--force"] if args.force else [])])


def _trainer_tool(module: str, argv: list[str]) -> int:
    """Run a torch-side tool in its own interpreter (the operator package never imports torch)."""
    return subprocess.call([sys.executable, "-m", module, *argv], env=os.environ.copy())


# typeshed names the type of add_subparsers() only under its private name
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # one group at a time, in the order `cptctl --help` lists them
    _file_commands(sub)
    _run_commands(sub)
    _checkpoint_commands(sub)
    _trainer_tools(sub)
    return parser


def _file_commands(sub: Subparsers) -> None:
    """Commands that read a CptRun file: check it, print the CRD, plan its memory, run it here."""
    p = sub.add_parser("validate", help="check a CptRun file; print every error with its field path")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the CptRun CustomResourceDefinition")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("plan", help="per-GPU and host memory by part; exit 1 (naming the smallest fix) "
                                    "if it won't fit")
    p.add_argument("file")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80Gi (default: resources.gpuMemory)")
    p.add_argument("--memory", help="host memory of one pod (one node's ranks), e.g. 512Gi "
                                    "(default: resources.memory)")
    p.add_argument("--nodes", type=int, help="default: resources.nodes")
    p.add_argument("--gpus-per-node", type=int, help="default: resources.gpusPerNode (0 plans a CPU run)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a CptRun on this machine (running it again resumes)")
    p.add_argument("file")
    p.add_argument("--run-dir", help="default: ./runs/<metadata.name>")
    p.add_argument("--nproc", type=int, default=None, help="trainer processes (default: spec)")
    p.add_argument("--fresh", action="store_true", help="start over: move an existing run dir aside")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=cmd_run)


def _run_commands(sub: Subparsers) -> None:
    """Commands that look at or steer a run, local or on a cluster (`_backend` decides which)."""
    for name, func, help_ in (("status", cmd_status, "phase, step, checkpoints and decisions"),
                              ("stop", cmd_stop, "stop a run after a consistent checkpoint"),
                              ("resume", cmd_resume, "continue a stopped run on a cluster from its newest "
                                                     "checkpoint (a local run resumes with `cptctl run`)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run", help="run directory or name under ./runs, or a CptRun's name on a cluster")
        if name == "status":
            p.add_argument("--json", action="store_true")
        _cluster_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("rollback", help="roll a run back to a checkpoint (or 'base')")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="checkpoint name (attempt-NNN/step-XXXXXXXX) or 'base'")
    _cluster_options(p)
    p.set_defaults(func=cmd_rollback)


def _checkpoint_commands(sub: Subparsers) -> None:
    """Commands that read a run's checkpoints: compare them, export one."""
    p = sub.add_parser("checkpoints", help="metrics per checkpoint, Pareto frontier and choice")
    p.add_argument("run")
    p.add_argument("--plot", help="write the curves (domain vs general, stability gap) to this PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser("export", help="a checkpoint as a Hugging Face model directory (safetensors)")
    p.add_argument("run", help="run directory or name under ./runs, or a checkpoint URI "
                               "(s3://bucket/prefix/step-XXXXXXXX)")
    p.add_argument("checkpoint", nargs="?", help="name (attempt-NNN/step-XXXXXXXX, step-XXXXXXXX) "
                   "or URI (default: the run's chosen checkpoint, else its newest valid one; nothing when the "
                   "run chose the base)")
    p.add_argument("--to", required=True, help="output directory; refused when not empty")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.set_defaults(func=cmd_export)


def _trainer_tools(sub: Subparsers) -> None:
    """Torch-side tools: `main` hands them every argument unparsed, so they own their own --help."""
    p = sub.add_parser("diagnose", help="is CPT the right lever? bits-per-byte gap + fragmentation",
                       add_help=False)
    p.set_defaults(func=lambda a: _trainer_tool("cpt_trainer.diagnose", a.rest))
    p = sub.add_parser("tokenizer", help="tokenizer analysis (fragmentation, candidate terms)",
                       add_help=False)
    p.set_defaults(func=lambda a: _trainer_tool("cpt_trainer.tokenizer_tools", a.rest))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in {"diagnose", "tokenizer"}:  # pass everything through to the tool
        args = argparse.Namespace(rest=argv[1:], func=parser._subparsers._group_actions[0]  # type: ignore[union-attr, index]
                                  .choices[argv[0]].get_default("func"))
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())



