"""The C interface: the example program compiled against the installed header and library."""

import os
import shutil
import subprocess

import pytest

import metal_moe as mm

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "c", "moe_example.c")


def compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    pytest.skip("no C compiler on PATH")


def test_example_program_builds_and_runs(tmp_path):
    lib = mm.get_library()
    exe = tmp_path / "moe_example"
    cmd = [compiler(), "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", mm.get_include(), EXAMPLE, lib,
           f"-Wl,-rpath,{os.path.dirname(lib)}", "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "forward ok" in run.stdout and "all checks passed" in run.stdout
    assert "routed forward ok: ids in range and weights summing to 1 = yes" in run.stdout
    assert "ids: expert index 4" in run.stdout


def test_header_compiles_as_cpp_too(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler")
    src = tmp_path / "h.cpp"
    src.write_text('#include "metal_moe.h"\nint main() { return mm_abi_version() == MM_ABI_VERSION ? 0 : 1; }\n')
    subprocess.run([cxx, "-fsyntax-only", "-Wall", "-Werror", "-I", mm.get_include(), str(src)], check=True)


def test_versions_agree():
    assert mm._native.version() == mm.__version__
    header = open(os.path.join(mm.get_include(), "metal_moe.h")).read()
    assert f"#define MM_ABI_VERSION {mm._native.abi_version()}" in header


def test_variant_registry_is_the_policy_list():
    """One source of truth: native/core/variants.def is what the library reports; the policy's
    list must be the same names in the same order."""
    assert mm._native.variant_names() == mm.policy.VARIANTS
    for name in mm.policy.VARIANTS:
        info = mm._native.describe_variant(name)
        assert info["tile_n"] == mm.policy.TILE_N[name]
        twin = info["fp32acc_twin"]
        assert (twin or name) == mm.policy.fp32_fallback(name)
        assert info["fp32_accumulate"] == (not mm.policy.accumulates_fp16(name))
        spec = info["bits_x2"]
        if any(spec):
            assert name.endswith("_%d_%d_%d" % tuple(b // 2 for b in spec))


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"^variant: unknown kernel variant 'nope'; valid variants: moe_trellis"):
        mm._native.describe_variant("nope")
