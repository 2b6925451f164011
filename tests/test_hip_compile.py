"""AMD portability of the CuPy kernels, without an AMD GPU.

- The metadata parser of ``check-kernels --hip`` and the HIP branch's bfloat16 conversions run
  everywhere (the latter compiled as host code with g++, checked against ml_dtypes).
- A few instantiations are compiled with hipcc (``--hip``) and with hiprtc (``--hiprtc``, the
  run-time path of CuPy on ROCm) when those are installed (Debian: ``apt-get install hipcc``);
  otherwise those tests skip. CI compiles every instantiation with ``ssmcore check-kernels --hip``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

HEADER = Path(__file__).resolve().parents[1] / "backends" / "cupy" / "common.cuh"

# `llvm-readelf --notes` of a code object with two kernels (trimmed from a real gfx90a one).
NOTES = """\
amdhsa.kernels:
  - .agpr_count:     0
    .args:
      - .address_space:  global
        .name:           x
        .offset:         0
        .size:           8
        .value_kind:     global_buffer
    .group_segment_fixed_size: 1024
    .max_flat_workgroup_size: 256
    .name:           _Z8conv_fwdIfLi0ELi8EEvPKT_PKfS4_
    .private_segment_fixed_size: 16
    .sgpr_count:     70
    .sgpr_spill_count: 0
    .vgpr_count:     24
    .vgpr_spill_count: 3
    .wavefront_size: 64
  - .args:           []
    .group_segment_fixed_size: 0
    .name:           ssd_seg
    .vgpr_count:     5
  - .args:           []
    .group_segment_fixed_size: 0
    .name:           _Z10column_sumIfEvPKfxiPT_
    .private_segment_fixed_size: 0
    .sgpr_count:     20
    .sgpr_spill_count: 0
    .vgpr_count:     8
    .vgpr_spill_count: 0
amdhsa.target:   amdgcn-amd-amdhsa--gfx90a
"""


def _check_module():
    pytest.importorskip("cupy")  # _runtime (the kernel sources) imports CuPy; no GPU needed
    from ssmcore.backends.cupy import _check

    return _check


def test_resources_parser_picks_the_named_kernel():
    chk = _check_module()
    res = chk._hip_resources(NOTES, "conv_fwd<float, 0, 8>")
    assert res == {"vgpr_count": 24, "sgpr_count": 70, "vgpr_spill_count": 3, "sgpr_spill_count": 0,
                   "private_segment_fixed_size": 16, "group_segment_fixed_size": 1024,
                   "max_flat_workgroup_size": 256, "wavefront_size": 64}
    assert chk._hip_resources(NOTES, "column_sum<float>")["vgpr_count"] == 8
    assert chk._hip_resources(NOTES, "ssd_seg")["vgpr_count"] == 5  # extern "C": not mangled
    assert chk._hip_resources(NOTES, "scan_fwd<float, 1, 1>") == {}  # absent: the check must fail


def test_hip_source_instantiates_the_name_expression():
    chk = _check_module()
    src = chk.hip_source("// body\n", "norm_fwd<half_t, 1, true>")
    assert src.startswith("// body\n")
    assert "reinterpret_cast<const void*>(&norm_fwd<half_t, 1, true>)" in src


def test_hip_name_spells_out_typedefs():
    pytest.importorskip("cupy")
    from ssmcore.backends.cupy._runtime import hip_name

    assert hip_name("state_update<half_t, bf16_t, true>") == "state_update<__half, bf16_t, true>"
    assert hip_name("scan_fwd<float, 1, 1>") == "scan_fwd<float, 1, 1>"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_hip_bf16_conversions_match_ml_dtypes(tmp_path, rng):
    """The HIP branch's own bfloat16 (round to nearest even, NaN kept) vs ml_dtypes, as host code."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    text = HEADER.read_text()
    hip = text[text.index("#define SSM_HIP 1"):text.index("#else\n#define SSM_HIP 0")]
    struct = re.search(r"struct bf16_t \{.*?\};", hip, re.S).group(0)
    funcs = hip[hip.index("__device__ __forceinline__ float to_float(bf16_t x)"):]
    prog = tmp_path / "bf16.cpp"
    prog.write_text(
        "#include <cstdio>\n#include <cstring>\n#define __device__\n#define __forceinline__ inline\n"
        f"{struct}\n{funcs}\n"
        "int main() { unsigned int u; float f;\n"
        "  while (std::scanf(\"%x\", &u) == 1) { std::memcpy(&f, &u, 4); bf16_t b = to_bf16(f);\n"
        "    std::printf(\"%04x %08x\\n\", b.bits, [&] { float g = to_float(b); unsigned int w;"
        " std::memcpy(&w, &g, 4); return w; }()); } }\n")
    exe = tmp_path / "bf16"
    subprocess.run(["g++", "-std=c++17", "-O1", str(prog), "-o", str(exe)], check=True, capture_output=True)
    x = np.concatenate([
        (rng.standard_normal(4000) * np.exp2(rng.integers(-135, 125, 4000))).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895e38, 1e-45], np.float32),
    ])
    bits = x.view(np.uint32)
    out = subprocess.run([str(exe)], input="\n".join(f"{b:08x}" for b in bits), capture_output=True,
                         text=True, check=True).stdout.split()
    got16 = np.array([int(v, 16) for v in out[0::2]], np.uint16)
    back = np.array([int(v, 16) for v in out[1::2]], np.uint32)
    want16 = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got16, want16)
    np.testing.assert_array_equal(back, got16.astype(np.uint32) << 16)
    # NaN stays NaN (any payload), through both directions.
    nan_bits = np.array([0x7FC00000, 0xFFC00001, 0x7F800001], np.uint32)
    out = subprocess.run([str(exe)], input="\n".join(f"{b:08x}" for b in nan_bits), capture_output=True,
                         text=True, check=True).stdout.split()
    for v in out[0::2]:
        assert int(v, 16) & 0x7F80 == 0x7F80 and int(v, 16) & 0x7F, v


# A few instantiations of different families, 16-bit types included (name expressions with typedefs).
SAMPLE = [
    ("state_update", "state_update<half_t, bf16_t, true>"),
    ("norm", None),  # the family's first instantiation
    ("conv", None),
]


def _sample(chk):
    modules = chk._load_families([f for f, _ in SAMPLE])
    out = []
    for family, name in SAMPLE:
        names = list(modules[family].INSTANTIATIONS)
        name = name or names[0]
        assert name in names
        out.append((family, name))
    return out


@pytest.mark.skipif(shutil.which("hipcc") is None, reason="hipcc not installed (Debian: apt-get install hipcc)")
def test_hipcc_compiles_a_few_instantiations(tmp_path):
    chk = _check_module()
    from ssmcore.backends.cupy import _runtime

    hipcc = shutil.which("hipcc")
    for family, name in _sample(chk):
        (r,) = chk.hip_compile_one(family, _runtime.source(family), name, ["gfx90a"], hipcc, str(tmp_path))
        assert r["ok"], f"{family} {name}\n{r['log']}"
        res = r.get("resources")
        if res is not None:  # clang-offload-bundler and llvm-readelf found: the kernel is in the code object
            assert res["vgpr_count"] > 0 and res["wavefront_size"] == 64


@pytest.mark.skipif(shutil.which("hipcc") is None, reason="hipcc not installed (Debian: apt-get install hipcc)")
def test_hipcc_reports_a_broken_kernel(tmp_path):
    chk = _check_module()
    (r,) = chk.hip_compile_one("broken", "__global__ void k(float* p) { p[0] = undeclared; }", "k", ["gfx90a"],
                                  shutil.which("hipcc"), str(tmp_path))
    assert not r["ok"] and "undeclared" in r["log"]


def test_hiprtc_compiles_a_few_instantiations():
    chk = _check_module()
    lib, _ = chk._hiprtc()
    if lib is None:
        pytest.skip("hiprtc not installed (Debian: apt-get install libamdhip64-5)")
    from ssmcore.backends.cupy import _runtime

    options = (*_runtime.OPTIONS, "-fcuda-flush-denormals-to-zero")
    for family, name in _sample(chk):
        r = chk.hiprtc_compile_one(family, _runtime.source(family), name, "gfx90a", options)
        assert r["ok"], f"{family} {name}\n{r['log']}"
        base = name.split("<")[0]
        assert r["lowered"].startswith("_Z") and f"{len(base)}{base}" in r["lowered"]
