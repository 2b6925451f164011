"""``ssmcore check-kernels``: compile every kernel instantiation with NVRTC, no GPU needed.

Each family module of this package lists the name expressions it can launch in
``INSTANTIATIONS``; each is compiled alone (as ``_runtime.function`` does at run time) for
every architecture asked, with the include paths CuPy itself uses, and ptxas' resource report
is printed: registers, spill stores/loads, stack frame and static shared memory. The exit
status is 1 if any instantiation fails (its log is printed), else 0.

With ``--warm`` (on a machine with a GPU) every instantiation is compiled through CuPy instead,
in parallel processes, which fills CuPy's on-disk kernel cache: later processes start warm.

For AMD GPUs, ``--hip`` compiles every instantiation with hipcc and ``--hiprtc`` with hiprtc (the
compiler CuPy uses on ROCm), for the ``--offload-arch`` targets, no GPU needed (compile only).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

FAMILIES = ("scan", "conv", "state_update", "norm", "ssd", "ssd_bwd")
PACKAGE = "ssmcore.backends.cupy"
MODULES = {"ssd": "state_space_duality", "ssd_bwd": "state_space_duality_bwd"}  # family -> module, where they differ

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _instantiations(modules):
    """(family, full source, name expression) for every instantiation the modules list (HIP checks)."""
    from . import _runtime

    work = []
    for family, module in modules.items():
        names = list(getattr(module, "INSTANTIATIONS", ()))
        if not names:
            print(f"{family:13s} (module defines no INSTANTIATIONS)")
            continue
        source = _runtime.source(family)
        work += [(family, source, name) for name in names]
    return work


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
        name = f"{PACKAGE}.{MODULES.get(family, family)}"
        try:
            modules[family] = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            print(f"{family:13s} (no kernels yet: {name} does not exist)")
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


# ---- AMD: hipcc, compile only ------------------------------------------------------------------
# With --hip every instantiation is compiled for AMD targets by hipcc instead (device code only,
# all --offload-arch targets in one hipcc call): the family's source (the same text hiprtc gets at
# run time on ROCm) plus one host-side reference to the name expression, which makes clang
# instantiate and emit that kernel. Resources are read from the code object's metadata when
# clang-offload-bundler and llvm-readelf are found next to hipcc's clang.
HIP_ARCHS = "gfx90a,gfx940"
HIPRTC_ARCHS = "gfx90a"  # ROCm 5.2's hiprtc (Debian) crashes on gfx940
HIP_OPTIONS = ("-std=c++17", "-Wno-pragma-once-outside-header")


def _hip_tool(name: str, hipcc: str) -> str | None:
    """A clang tool (clang-offload-bundler, llvm-readelf) beside hipcc's clang, or on PATH."""
    import glob
    import shutil

    dirs = [os.environ.get("HIP_CLANG_PATH", ""), os.path.dirname(os.path.realpath(hipcc))]
    dirs += sorted(glob.glob("/opt/rocm*/llvm/bin"), reverse=True)
    dirs += sorted(glob.glob("/usr/lib/llvm-*/bin"), key=lambda d: int(re.sub(r"\D", "", d) or 0), reverse=True)
    for d in dirs:
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def hip_source(source: str, name: str) -> str:
    """The family source plus a reference that instantiates one name expression."""
    return (f"{source}\n// ssmcore check-kernels --hip: instantiate one name expression\n"
            f"__attribute__((used)) static const void* const ssm_hip_instance = "
            f"reinterpret_cast<const void*>(&{name});\n")


def _hip_resources(notes: str, name: str) -> dict:
    """VGPRs, SGPRs, spills, scratch and static LDS of the kernel `name` from `llvm-readelf --notes`.

    The AMDGPU metadata lists kernels as "  - .key: value" items whose keys sit two columns
    deeper than the dash (argument lists are nested further and skipped)."""
    base = re.sub(r"\s", "", name.split("<", 1)[0])
    kernels, cur, col = [], None, None
    for line in notes.splitlines():
        m = re.match(r"^(?P<lead>\s*)(?P<dash>- )?\.(?P<key>[a-z_]+):\s*(?P<value>\S*)\s*$", line)
        if not m:
            continue
        lead = len(m.group("lead"))
        if m.group("dash") and (col is None or lead == col):
            col, cur = lead, {}
            kernels.append(cur)
        elif cur is None or lead != col + 2:
            continue
        cur[m.group("key")] = m.group("value")
    for k in kernels:
        if k.get("name") == base or f"{len(base)}{base}" in k.get("name", ""):  # extern "C", or _Z<len><name>...
            return {key: int(k[key]) for key in ("vgpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
                                                 "private_segment_fixed_size", "group_segment_fixed_size",
                                                 "max_flat_workgroup_size", "wavefront_size") if key in k}
    return {}


def hip_compile_one(family: str, source: str, name: str, archs: list, hipcc: str, workdir: str) -> list:
    """Compile one name expression for every AMD target with hipcc; one result per target."""
    import hashlib
    import subprocess

    tag = hashlib.sha1(f"{family}:{name}".encode()).hexdigest()[:16]
    src, obj = os.path.join(workdir, f"{family}_{tag}.hip"), os.path.join(workdir, f"{family}_{tag}.co")
    with open(src, "w") as f:
        f.write(hip_source(source, name))
    env = dict(os.environ, HIP_PLATFORM="amd")  # Debian's hipcc picks NVIDIA when nvcc is on PATH
    cmd = [hipcc, "-x", "hip", "--cuda-device-only", *HIP_OPTIONS, *(f"--offload-arch={a}" for a in archs),
           "-c", src, "-o", obj]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and os.path.exists(obj)
    results = [{"family": family, "name": name, "arch": a, "ok": ok, "seconds": seconds, "log": log,
                "cmd": " ".join(cmd)} for a in archs]
    bundler, readelf = _hip_tool("clang-offload-bundler", hipcc), _hip_tool("llvm-readelf", hipcc)
    if ok and bundler and readelf:
        for r in results:
            elf = f"{obj}.{r['arch']}.elf"
            unbundle = subprocess.run(
                [bundler, "--type=o", f"--targets=hipv4-amdgcn-amd-amdhsa--{r['arch']}", f"--input={obj}",
                 f"--output={elf}", "--unbundle"], capture_output=True, text=True)
            if unbundle.returncode == 0:
                notes = subprocess.run([readelf, "--notes", elf], capture_output=True, text=True).stdout
                r["resources"] = _hip_resources(notes, name)
                if not r["resources"]:  # the kernel must be in the code object, else nothing was checked
                    r["ok"], r["log"] = False, f"{name} not found in the {r['arch']} code object\n{notes[:4000]}"
    return results


def _hip_line(r: dict) -> str:
    if not r["ok"]:
        return f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} FAILED"
    res = r.get("resources") or {}
    if not res:
        return f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} ok  {r['seconds']:.2f}s"
    spills = res.get("vgpr_spill_count", 0) + res.get("sgpr_spill_count", 0)
    return (
        f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} vgpr {res.get('vgpr_count')!s:>3s}  "
        f"sgpr {res.get('sgpr_count')!s:>3s}  spill v/s {res.get('vgpr_spill_count')}/{res.get('sgpr_spill_count')}  "
        f"scratch {res.get('private_segment_fixed_size')}  lds {res.get('group_segment_fixed_size')}"
        f"  {r['seconds']:.2f}s{'  SPILLS' if spills else ''}"
    )


def hip_check(modules: dict, archs: list, jobs: int, hipcc: str | None = None) -> int:
    """Compile every instantiation of `modules` for the AMD `archs` with hipcc; 1 if any fails."""
    import shutil
    import subprocess
    import tempfile

    hipcc = hipcc or os.environ.get("HIPCC") or shutil.which("hipcc")
    if not hipcc:
        print("hipcc not found (Debian/Ubuntu: apt-get install hipcc; ROCm: /opt/rocm/bin on PATH)")
        return 1
    version = subprocess.run([hipcc, "--version"], capture_output=True, text=True,
                             env=dict(os.environ, HIP_PLATFORM="amd"))
    print(f"hipcc {hipcc}: {' '.join((version.stdout or version.stderr).split()[:3])}; targets {','.join(archs)}")
    work = _instantiations(modules)
    start = time.perf_counter()
    failures = []
    with tempfile.TemporaryDirectory(prefix="ssmcore-hip-") as workdir, \
            ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for results in pool.map(lambda job: hip_compile_one(*job, archs, hipcc, workdir), work):
            for r in results:
                print(_hip_line(r), flush=True)
            if not all(r["ok"] for r in results):
                failures.append(next(r for r in results if not r["ok"]))
    print(f"{len(work) * len(archs)} hipcc compilations ({len(work)} instantiations x {len(archs)} targets), "
          f"{len(failures)} instantiations failed, {time.perf_counter() - start:.1f}s")
    for r in failures:
        print(f"\n---- {r['family']} {r['name']} {r['arch']} ----\n{r['cmd']}\n{r['log']}")
    return 1 if failures or not work else 0


# ---- AMD: hiprtc, the run-time path -------------------------------------------------------------
# With --hiprtc every instantiation is compiled the way CuPy's RawModule does on ROCm: hiprtc (from
# libhiprtc / libamdhip64, through ctypes, no GPU needed), with a name expression, CuPy's extra
# options (-fcuda-flush-denormals-to-zero and hipcc's include directories) and the name spelled
# as _runtime.function spells it on HIP; the lowered (mangled) name must come back.
_HIPRTC_LIBS = ("libhiprtc.so", "libhiprtc.so.7", "libhiprtc.so.6", "libamdhip64.so", "libamdhip64.so.7",
                "libamdhip64.so.6", "libamdhip64.so.5")


def _hiprtc():
    """(ctypes library with the hiprtc API, its file name), or (None, None)."""
    import ctypes

    for name in _HIPRTC_LIBS:
        try:
            lib = ctypes.CDLL(name)
            lib.hiprtcCreateProgram  # noqa: B018 (raises AttributeError when absent)
            return lib, name
        except (OSError, AttributeError):
            continue
    return None, None


def hiprtc_compile_one(family: str, source: str, name: str, arch: str, options: tuple) -> dict:
    """Compile one name expression with hiprtc for one AMD target (runs in a worker process)."""
    import ctypes

    from ._runtime import hip_name

    lib, _ = _hiprtc()
    expr = hip_name(name).encode()
    result = {"family": family, "name": name, "arch": arch, "ok": False, "log": "", "lowered": None}
    start = time.perf_counter()
    prog = ctypes.c_void_p()
    if lib.hiprtcCreateProgram(ctypes.byref(prog), source.encode(), f"{family}.cu".encode(), 0, None, None) != 0:
        result["log"] = "hiprtcCreateProgram failed"
        return result
    try:
        lib.hiprtcAddNameExpression(prog, expr)
        opts = [o.encode() for o in (*options, f"--offload-arch={arch}")]
        status = lib.hiprtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        lib.hiprtcGetProgramLog(prog, log)
        result["log"] = log.value.decode(errors="replace")
        if status == 0:
            lowered = ctypes.c_char_p()
            if lib.hiprtcGetLoweredName(prog, expr, ctypes.byref(lowered)) == 0 and lowered.value:
                result["lowered"] = lowered.value.decode()
                lib.hiprtcGetCodeSize(prog, ctypes.byref(size))
                result["ok"] = size.value > 0
                result["code_bytes"] = size.value
            else:
                result["log"] += f"\nhiprtcGetLoweredName found no kernel for {hip_name(name)!r}"
        result["log"] = f"hiprtc options: {' '.join(o.decode() for o in opts)}\n{result['log']}"
    finally:
        lib.hiprtcDestroyProgram(ctypes.byref(prog))
    result["seconds"] = time.perf_counter() - start
    return result


def _hiprtc_job(job) -> dict:
    return hiprtc_compile_one(*job)


def _hipcc_include_dirs() -> tuple:
    """The include directories CuPy adds for hiprtc (it asks hipcc, as here); () without hipcc."""
    import shutil
    import subprocess

    hipcc = os.environ.get("HIPCC") or shutil.which("hipcc")
    if not hipcc:
        return ()
    proc = subprocess.run([hipcc, "-x", "hip", "-E", "-v", "/dev/null"], capture_output=True, text=True,
                          env=dict(os.environ, HIP_PLATFORM="amd"))
    m = re.search(r"#include <\.\.\.> search starts here:\n(.*?)\nEnd of search list.", proc.stderr, re.S)
    return tuple(line.strip() for line in m.group(1).splitlines() if line.strip()) if m else ()


def hiprtc_check(modules: dict, archs: list, jobs: int) -> int:
    """Compile every instantiation with hiprtc for the AMD `archs`; 1 if any fails."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from . import _runtime

    lib, libname = _hiprtc()
    if lib is None:
        print(f"hiprtc not found (none of {', '.join(_HIPRTC_LIBS)} loads; Debian: apt-get install libamdhip64-5)")
        return 1
    options = (*_runtime.OPTIONS, "-fcuda-flush-denormals-to-zero", *(f"-I{d}" for d in _hipcc_include_dirs()))
    print(f"hiprtc from {libname}; targets {','.join(archs)}; options {' '.join(options)}")
    work = [(family, source, name, arch, options) for family, source, name in _instantiations(modules)
            for arch in archs]
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    for arch in archs:  # a hiprtc that does not know a target may crash (ROCm 5.2 on gfx940): say so
        probe = ("probe", "__global__ void ssm_probe(float* p) { p[threadIdx.x] = 1.f; }", "ssm_probe", arch, options)
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                ok = pool.submit(_hiprtc_job, probe).result()["ok"]
        except BrokenProcessPool:
            ok = False
        if not ok:
            print(f"hiprtc from {libname} cannot compile a trivial kernel for {arch} (crashed or refused): "
                  f"this hiprtc does not support that target; pass --offload-arch without it")
            return 1
    start = time.perf_counter()
    failures = []
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        for r in pool.map(_hiprtc_job, work):
            if r["ok"]:
                print(f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} ok  {r['code_bytes']} bytes  "
                      f"{r['lowered'][:48]}  {r['seconds']:.2f}s", flush=True)
            else:
                print(f"{r['family']:13s} {r['name']:44s} {r['arch']:6s} FAILED", flush=True)
                failures.append(r)
    print(f"{len(work)} hiprtc compilations, {len(failures)} failed, {time.perf_counter() - start:.1f}s")
    for r in failures:
        print(f"\n---- {r['family']} {r['name']} {r['arch']} ----\n{r['log']}")
    return 1 if failures or not work else 0


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
    parser.add_argument("--hip", action="store_true",
                        help="compile for AMD GPUs with hipcc instead (compile only, no GPU needed)")
    parser.add_argument("--hiprtc", action="store_true",
                        help="compile for AMD GPUs with hiprtc, as CuPy on ROCm does at run time (no GPU needed)")
    parser.add_argument("--offload-arch", default=None,
                        help=f"with --hip/--hiprtc: comma-separated AMD targets (default {HIP_ARCHS} for "
                             f"--hip, {HIPRTC_ARCHS} for --hiprtc)")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs:
        parser.error("--arch: expected at least one target such as sm_90")

    from . import _runtime

    modules = _load_families(args.family)
    if args.hip or args.hiprtc:
        def targets(default: str) -> list:
            out = [a.strip() for a in (args.offload_arch or default).split(",") if a.strip()]
            if not out:
                parser.error("--offload-arch: expected at least one target such as gfx90a")
            return out

        status = hip_check(modules, targets(HIP_ARCHS), args.jobs) if args.hip else 0
        return max(status, hiprtc_check(modules, targets(HIPRTC_ARCHS), args.jobs) if args.hiprtc else 0)
    if args.warm:
        return warm(modules, args.jobs)
    jobs = [(family, source, name, arch) for family, source, name in _instantiations(modules) for arch in archs]

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
