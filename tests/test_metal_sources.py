"""The Linux-side check of the Metal shaders: shaders/metal/*.metal compiled as C++17 with
-fsyntax-only against shaders/metal/compat/metal_stdlib, a small header of our own that maps the
Metal qualifiers, types and built-ins the shaders use (it documents what it cannot check: address
spaces, attributes, Metal's own limits).  Every variant's kernels are instantiated, and the shared
header's Metal branch is compiled, so a typo or a type error in either fails here."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHADERS = ROOT / "shaders" / "metal"
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

pytestmark = [
    pytest.mark.skipif(not SHADERS.is_dir(), reason="run from a source checkout (the shaders are not installed)"),
    pytest.mark.skipif(COMPILER is None, reason="no C++ compiler"),
]


def syntax_check(path):
    cmd = [COMPILER, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-attributes",
           "-Wno-unknown-attributes", "-x", "c++", "-D__METAL_VERSION__=310", "-I", str(SHADERS / "compat"),
           "-I", str(ROOT / "shaders" / "common"), "-I", str(SHADERS), str(path)]
    if "clang" not in Path(COMPILER).name:
        cmd.remove("-Wno-unknown-attributes")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", sorted(SHADERS.glob("*.metal")), ids=lambda p: p.name)
def test_metal_sources_compile_as_cpp(path):
    result = syntax_check(path)
    assert result.returncode == 0, result.stderr


def test_the_check_catches_errors(tmp_path):
    """The check is not vacuous: an undeclared name inside a variant's template body fails it."""
    src = (SHADERS / "moe_kernels.metal").read_text()
    broken = src.replace("simdgroup_store(acc[m][b][0], st, 16);", "simdgroup_store(acc[m][b][0], stt, 16);")
    assert broken != src
    (tmp_path / "broken.metal").write_text(broken)
    result = syntax_check(tmp_path / "broken.metal")
    assert result.returncode != 0 and "stt" in result.stderr


METAL_KEYWORDS = ("half", "device", "constant", "threadgroup", "thread", "kernel", "vertex", "fragment", "sampler",
                  "texture", "visible", "patch", "stage_in")


def _code(path):
    """The file without comments and string literals."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def test_the_shared_header_uses_no_metal_keyword_as_a_name():
    """Metal reserves these words; the compatibility header cannot (a C++ variable may be called
    `half`), so the shared header, plain C for every backend, must not use them at all."""
    code = _code(ROOT / "shaders" / "common" / "mm_exl3.h")
    used = sorted({w for w in METAL_KEYWORDS if re.search(rf"\b{w}\b", code)})
    assert not used, f"Metal keywords used as names in mm_exl3.h: {used}"
