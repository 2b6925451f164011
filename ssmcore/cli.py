"""The ``ssmcore`` command line.

    ssmcore info                 versions, backends and devices seen
    ssmcore bench-cpu            selective_scan on the CPU vs a PyTorch loop over L, and kernel cache latency
    ssmcore check-kernels        compile every GPU kernel instantiation with NVRTC (no GPU needed)
    ssmcore generate             generate text (the shipped model unless --model is given)
    ssmcore bench-generate       prompt-processing and decoding speed of a model
    ssmcore train                train a byte-level Mamba language model
    ssmcore convert              convert checkpoints to / from transformers' Mamba / Mamba2 format
    ssmcore eval                 lm-evaluation-harness with the model type ``ssmcore`` (lm_eval's arguments)

The torch commands parse their own arguments, so ``ssmcore --help`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as err:  # an optional library that is absent or broken
        return f"not available ({type(err).__name__})"


def cmd_info(args) -> int:
    import platform

    import ssmcore

    print(f"ssmcore {ssmcore.__version__} on Python {platform.python_version()} ({platform.machine()})")
    for module in ("numpy", "numba", "ml_dtypes", "cupy", "torch"):
        print(f"  {module:10s} {_version(module)}")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        for i in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            print(f"  GPU {i}: {props['name'].decode()} (cupy backend)")
    except Exception:
        print("  no GPU visible to CuPy: the numba CPU backend runs every op")
    return 0


def cmd_bench_cpu(args) -> int:
    from ssmcore import _bench_cpu

    return _bench_cpu.main(args)


def cmd_check_kernels(args) -> int:
    from ssmcore.backends.cupy import _check

    return _check.main(args.rest)


# command -> (module, function adding its arguments, function running it)
_TORCH_COMMANDS = {
    "generate": ("ssmcore.adapters.torch.cli_generate", "add_arguments_generate", "run_generate",
                 "generate text, streamed as it is produced"),
    "bench-generate": ("ssmcore.adapters.torch.cli_generate", "add_arguments_bench", "run_bench",
                       "prompt-processing and decoding latency and tokens/s"),
    "train": ("ssmcore.adapters.torch.train", "add_arguments", "run", "train a byte-level Mamba language model"),
    "convert": ("ssmcore.adapters.torch.hf_convert", "add_arguments", "run",
                "convert a checkpoint to (--to hf) or from (--to ssmcore) transformers' Mamba/Mamba2 format"),
}


def cmd_eval(args) -> int:
    try:
        from ssmcore.adapters.torch import lm_eval_model
    except ImportError as err:
        print(f"ssmcore eval: needs lm-eval ({err}): pip install 'ssmcore[eval]'", file=sys.stderr)
        return 2
    return lm_eval_model.main(args.rest)


def _run_torch_command(args) -> int:
    # Idle OpenMP threads of torch spin by default, costing CPU that decode steps need; this only
    # takes effect if set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module_name, add_name, run_name, help_text = _TORCH_COMMANDS[args.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ssmcore {args.command}", description=help_text)
    getattr(module, add_name)(parser)
    return getattr(module, run_name)(parser.parse_args(args.rest))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssmcore", description="Selective state space models: kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, backends and devices").set_defaults(func=cmd_info)

    bench = sub.add_parser("bench-cpu", help="selective_scan CPU speed vs a PyTorch loop, and Numba cache latency")
    bench.add_argument("--batch", type=int, default=2)
    bench.add_argument("--dim", type=int, default=1536)
    bench.add_argument("--seqlen", type=int, default=2048)
    bench.add_argument("--dstate", type=int, default=16)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    bench.add_argument("--no-cache-test", action="store_true", help="skip the first-call vs cached-call test")
    bench.set_defaults(func=cmd_bench_cpu)

    # Commands that parse their own arguments get everything after their name (see below).
    sub.add_parser("check-kernels", help="compile every GPU kernel with NVRTC", add_help=False).set_defaults(
        func=cmd_check_kernels, own_arguments=True)

    sub.add_parser("eval", help="lm-evaluation-harness with --model ssmcore (all arguments are lm_eval's)",
                   add_help=False).set_defaults(func=cmd_eval, own_arguments=True)

    for command, (_, _, _, help_text) in _TORCH_COMMANDS.items():
        sub.add_parser(command, help=help_text, add_help=False).set_defaults(
            func=_run_torch_command, own_arguments=True)

    args, rest = parser.parse_known_args(argv)
    if getattr(args, "own_arguments", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
