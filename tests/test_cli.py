"""The metal-moe command: --help of every subcommand, demo exit codes, bench --json, select, info."""

import json
import subprocess
import sys
import tempfile

import pytest

import metal_moe as mm
from metal_moe import cli, policy

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")

SMALL = ["--preset", "qwen3-30b-a3b", "--experts", "8", "--quiet"]


def run(*args):
    # from a folder outside the checkout, so that `-m metal_moe` imports the installed package
    return subprocess.run([sys.executable, "-m", "metal_moe", *args], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())


@pytest.mark.parametrize("sub", [[], ["demo"], ["bench"], ["tune"], ["info"], ["select"]])
def test_help(sub):
    r = run(*sub, "--help")
    assert r.returncode == 0 and "usage: metal-moe" in r.stdout


def test_no_arguments_runs_the_self_check():
    r = run()
    assert r.returncode == 0
    assert "decode self-check: passed" in r.stdout and mm.__version__ in r.stdout


def test_demo_passes_and_a_forced_failure_exits_nonzero(capsys):
    assert cli.main(["demo", *SMALL, "--batch", "1,3", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "moe_trellis_swiglu_decode" in out
    # tolerance 0 cannot be met by any kernel with fp16 intermediates: the check must fail
    assert cli.main(["demo", *SMALL, "--batch", "2", "--repeats", "1", "--tolerance", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_demo_json():
    r = run("demo", *SMALL, "--batch", "1,17", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["batch"] for row in rows] == [1, 17]
    for row in rows:
        assert row["pass"] and row["max_rel_error"] <= row["tolerance"]
        assert row["variant"] == policy.select(row["batch"], True, 4, 4, 4).name


def test_no_shared_option_drops_the_presets_shared_expert(tmp_path):
    """glm-4.7-flash has a shared expert; bench --no-shared times the same preset without it (and
    still checks each result against the reference); loaded weights refuse the option."""
    got = {}
    for flag in ([], ["--no-shared"]):
        path = tmp_path / f"b{len(flag)}.json"
        assert cli.main(["bench", "--preset", "glm-4.7-flash", "--experts", "4", "--quiet", "--batch", "2",
                         "--repeats", "1", "--warmup", "0", "--no-baseline", *flag, "--json", str(path)]) == 0
        got[bool(flag)] = json.loads(path.read_text())
    assert got[False]["weights"].endswith(", shared)") and not got[True]["weights"].endswith(", shared)")
    assert all(r["max_rel_error"] < 1e-2 for r in got[True]["results"])
    with pytest.raises(SystemExit, match="--no-shared is for random weights"):
        cli.main(["bench", "--weights", "x.safetensors", "--prefix", "m", "--no-shared", "--quiet"])


@pytest.mark.parametrize("codebook", ["mcg", "mul1"])
def test_codebook_option_builds_random_weights_with_that_codebook(codebook, tmp_path):
    path = tmp_path / "b.json"
    assert cli.main(["bench", *SMALL, "--codebook", codebook, "--batch", "2", "--repeats", "1", "--warmup", "0",
                     "--no-baseline", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert f"codebooks=('{codebook}', '{codebook}', '{codebook}')" in res["weights"]
    assert all(r["max_rel_error"] < 1e-2 for r in res["results"])      # checked against the reference
    with pytest.raises(SystemExit, match="--codebook is for random weights"):
        cli.main(["demo", "--weights", "x.safetensors", "--prefix", "m", "--codebook", codebook, "--quiet"])


def test_bench_json_schema(tmp_path):
    path = tmp_path / "b.json"
    assert cli.main(["bench", *SMALL, "--batch", "1,4", "--variants", "all", "--repeats", "2", "--warmup", "1",
                     "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert {"preset", "backend", "machine", "weights", "results", "repeats"} <= set(res)
    names = {r["variant"] for r in res["results"]}
    assert policy.SIMD in names and policy.DECODE in names and policy.DECODE + "_6_2_3" not in names   # bits 4/4/4
    for r in res["results"]:
        assert {"batch", "variant", "policy_choice", "median_s", "min_s", "weight_gbps", "weights_per_s",
                "baseline_s", "ratio", "max_rel_error"} <= set(r)
        assert r["median_s"] > 0 and r["baseline_s"] > 0 and r["max_rel_error"] < 1e-2
    assert sum(r["policy_choice"] for r in res["results"]) == 2


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    assert cli.main(["bench", *SMALL, "--batch", "1,2", "--variants", "policy", "--repeats", "1", "--warmup", "0",
                     "--no-baseline", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("batch,bits,fp32,hidden", [(1, "6,2,3", False, 512), (1, "6,2,3", False, 2048),
                                                    (16, "4,4,4", True, 512), (33, "3,3,4", False, 512),
                                                    (33, "3,3,4", False, 7168)])
def test_select_matches_the_policy(batch, bits, fp32, hidden):
    args = ["select", "--batch", str(batch), "--bits", bits, "--hidden", str(hidden), "--json"]
    r = run(*args, *(["--fp32-acc"] if fp32 else []))
    data = json.loads(r.stdout)
    use = policy.auto_fp32_acc(True if fp32 else None, hidden)
    assert (data["variant"], data["tile_n"]) == policy.select_moe_kernel(batch, use, *map(int, bits.split(",")))
    assert data["rule"] and data["use_fp32_acc"] == use


def test_select_rejects_bad_bits():
    r = run("select", "--batch", "1", "--bits", "6,2")
    assert r.returncode == 2 and "three bit widths" in r.stderr


def test_info_fields():
    data = json.loads(run("info", "--json").stdout)
    assert data["version"] == mm.__version__ and data["abi_version"] == mm._native.abi_version()
    assert "cpu" in data["backends_built"] and data["backends_usable"] == mm.backends()
    assert data["cpu_simd"] in ("avx2+fma+f16c", "scalar") and data["cpu_threads"] >= 1
    assert data["variants"] == list(policy.VARIANTS) and data["build"]["buildtype"]


def test_demo_on_a_checkpoint(tmp_path, capsys):
    """--weights/--prefix: a layer saved in the EXL3 checkpoint layout, loaded and checked."""
    w = mm.MoEWeights.random(hidden=256, intermediate=384, experts=3, bits=(4, 2, 3), codebook="mcg", shared=True,
                             seed=3)
    path = tmp_path / "layer.safetensors"
    w.save_safetensors(path, "model.layers.0.mlp")
    assert cli.main(["demo", "--weights", str(path), "--prefix", "model.layers.0.mlp", "--batch", "1,5",
                     "--repeats", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "experts=3" in out and "all checks passed" in out
    with pytest.raises(SystemExit, match="--weights needs --prefix"):
        cli.main(["demo", "--weights", str(path), "--quiet"])
