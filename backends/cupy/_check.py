"""``ssmcore check-kernels``: compile every kernel instantiation with NVRTC, no GPU needed.

Each family module of this package lists the name expressions it can launch in
``INSTANTIATIONS``; each is compiled alone (as ``_runtime.function`` does at run time) for
every architecture asked, with the include paths CuPy itself uses, and ptxas' resource report
is printed: registers, spill stores/loads, stack frame and static shared memory. The exit
status is 1 if any instantiation fails (its log is printed), else 0.

With ``--warm`` (on a machine with a GPU) every instantiation is compiled through CuPy instead,
in parallel processes, which fills CuPy's on-disk kernel cache: later processes start warm.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

FAMILIES = ("scan", "conv", "state_update", "norm", "ssd")
PACKAGE = "ssmcore.backends.cupy"

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _compile_options(arch: str) -> list[str]:
    """The options CuPy's RawModule compiles with (its include paths), for one architecture."""
    from cupy._core import core

    from . import _runtime

    return list(core.assemble_cupy_compiler_options(_runtime.OPTIONS + (f"-arch={arch}", "-Xptxas=-v")))


def _resources(log: str, lowered: str) -> dict:
    """Registers, spills, stack and shared memory of one entry function from ptxas' report."""
    out = {"registers": None, "spill_stores": None, "spill_loads": None, "stack": None, "smem": 0}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _ENTRY.search(line)
        if not m or m.group("name") != lowered:
            continue
        for follow in lines[i + 1 : i + 6]:
            if (f := _FRAME.search(follow)) is not None:
                out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in f.groups())
            if (u := _USED.search(follow)) is not None:
                out["registers"] = int(u.group(1))
                out["smem"] = int(u.group(2) or 0)
                break
        break
    return out


def compile_one(family: str, source: str, name: str, arch: str) -> dict:
    """Compile one name expression; returns ok, resources and the NVRTC log."""
    from cupy_backends.cuda.libs import nvrtc

    result = {"family": family, "name": name, "arch": arch, "ok": False, "log": ""}
    start = time.perf_counter()
    prog = nvrtc.createProgram(source, f"{family}.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, _compile_options(arch))
            result["ok"] = True
        except nvrtc.NVRTCError:
            pass
        result["log"] = nvrtc.getProgramLog(prog)
        if result["ok"]:
            result.update(_resources(result["log"], nvrtc.getLoweredName(prog, name)))
    finally:
        nvrtc.destroyProgram(prog)
    result["seconds"] = time.perf_counter() - start
    return result


def _load_families(selected) -> dict:
    """family -> module for the families that exist (all of FAMILIES, or the selected ones)."""
    modules = {}
    for family in selected or FAMILIES:
        try:
            modules[family] = importlib.import_module(f"{PACKAGE}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{PACKAGE}.{family}":
                raise
            print(f"{family:13s} (no kernels yet: {PACKAGE}.{family} does not exist)")
    return modules


def _line(r: dict) -> str:
    if not r["ok"]:
        return f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} FAILED"
    spills = r["spill_stores"] or r["spill_loads"]
    return (
        f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} regs {r['registers']!s:>3s}  "
        f"spill st/ld {r['spill_stores']}/{r['spill_loads']}  stack {r['stack']}  smem {r['smem']}"
        f"  {r['seconds']:.2f}s{'  SPILLS' if spills else ''}"
    )


def _warm_one(job) -> str:
    """Compile one instantiation through CuPy on this process's GPU (fills CuPy's kernel cache)."""
    family, name = job
    from . import _runtime

    start = time.perf_counter()
    try:
        _runtime.function(family, name)
    except Exception as err:  # reported, not raised: the other instantiations still warm
        return f"{family:13s} {name:44s} FAILED {type(err).__name__}: {err}"
    return f"{family:13s} {name:44s} cached in {time.perf_counter() - start:.2f}s"


def warm(modules: dict, jobs: int) -> int:
    """Compile every instantiation through CuPy in `jobs` processes, so later processes start warm."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    work = [(family, name) for family, module in modules.items() for name in getattr(module, "INSTANTIATIONS", ())]
    start = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(_warm_one, work):
            print(line, flush=True)
            failed += "FAILED" in line
    print(f"{len(work)} instantiations warmed, {failed} failed, {time.perf_counter() - start:.1f}s")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ssmcore check-kernels",
        description="Compile every CuPy kernel instantiation with NVRTC (no GPU needed) and report resources.",
    )
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="only this family (repeatable; default: every family that exists)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--warm", action="store_true",
                        help="compile through CuPy on this machine's GPU instead, filling CuPy's kernel cache")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs:
        parser.error("--arch: expected at least one target such as sm_90")

    from . import _runtime

    modules = _load_families(args.family)
    if args.warm:
        return warm(modules, args.jobs)
    jobs = []
    for family, module in modules.items():
        names = list(getattr(module, "INSTANTIATIONS", ()))
        if not names:
            print(f"{family:13s} (module defines no INSTANTIATIONS)")
            continue
        source = _runtime.source(family)
        jobs += [(family, source, name, arch) for name in names for arch in archs]

    start = time.perf_counter()
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(lambda job: compile_one(*job), jobs):
            print(_line(r), flush=True)
            if not r["ok"]:
                failures.append(r)
    print(f"{len(jobs)} compilations, {len(failures)} failed, {time.perf_counter() - start:.1f}s")
    for r in failures:
        print(f"\n---- {r['family']} {r['name']} {r['arch']} ----\n{r['log']}")
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    sys.exit(main())
