"""metal-moe tune: the per-device table it measures and stores, the policy's use of it, and that a
variant failing its correctness check is never chosen.  (Timings are made but not asserted on.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import bench, policy, tune

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAL_MOE_CACHE", str(tmp_path))
    monkeypatch.delenv("METAL_MOE_TUNED", raising=False)
    return tmp_path


def small():
    return mm.MoEWeights.random(hidden=256, intermediate=256, experts=4, bits=(6, 2, 3), shared=True, seed=3)


def test_tune_stores_a_table_the_policy_prefers(cache, monkeypatch):
    w = small()
    table = tune.tune("cpu", weights=w, batches=(1, 4), repeats=1)
    assert os.path.dirname(table["path"]) == str(cache) and os.path.isfile(table["path"])
    assert {(e["batch"], e["fp32"]) for e in table["entries"]} == {(1, False), (1, True), (4, False), (4, True)}
    passed = {m["variant"] for m in table["measured"] if m["passed"]}
    for e in table["entries"]:
        assert e["variant"] in passed and policy.accepts_bits(e["variant"], (6, 2, 3))
        if e["fp32"]:
            assert not policy.accumulates_fp16(e["variant"])
        fastest = min(m["seconds"] for m in table["measured"] if m["batch"] == e["batch"] and m["passed"] and
                      not (e["fp32"] and policy.accumulates_fp16(m["variant"])))
        assert e["seconds"] == fastest
    # the policy now decides from it: batch 2 and 3 take batch 1's entry, 4 and up batch 4's
    for batch, measured in ((1, 1), (3, 1), (4, 4), (500, 4)):
        d = mm.api.resolve_kernel(batch, w, use_fp32_acc=False)
        want = next(e["variant"] for e in table["entries"] if e["batch"] == measured and not e["fp32"])
        assert d.name == want and d.rule.startswith(f"tuned table {table['path']}") and d.table == table["path"]
    # other bits have no measurement: the default table
    other = mm.MoEWeights.random(hidden=256, intermediate=256, experts=4, bits=(4, 4, 4), seed=3)
    assert mm.api.resolve_kernel(4, other, use_fp32_acc=False) == policy.select(4, False, 4, 4, 4)
    monkeypatch.setenv("METAL_MOE_TUNED", "0")
    assert mm.api.resolve_kernel(4, w, use_fp32_acc=False) == policy.select(4, False, 6, 2, 3)


def test_a_variant_that_fails_its_check_is_never_chosen(cache, monkeypatch):
    good = policy.GENERAL + "_fp32acc"
    real = bench._check

    def check(weights, call, variant, backend, rsf, tokens=4):
        return real(weights, call, variant, backend, rsf, tokens) if variant == good else float("inf")

    monkeypatch.setattr(bench, "_check", check)
    table = tune.tune("cpu", weights=small(), batches=(1, 16), repeats=1)
    assert {e["variant"] for e in table["entries"]} == {good}
    assert {m["variant"] for m in table["measured"] if not m["passed"]} == set(policy.VARIANTS) - {good} - {
        v for v in policy.VARIANTS if not policy.accepts_bits(v, (6, 2, 3))}


def test_select_shows_which_table_decided(cache):
    table = tune.tune("cpu", weights=small(), batches=(1,), repeats=1)
    env = dict(os.environ, METAL_MOE_CACHE=str(cache))

    def select(*extra, as_json=True):
        r = subprocess.run([sys.executable, "-m", "metal_moe", "select", "--batch", "1", "--bits", "6,2,3",
                            *(["--json"] if as_json else []), "--backend", "cpu", *extra], capture_output=True,
                           text=True, env=env, cwd=str(cache), timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if as_json else r.stdout

    tuned = select()
    assert tuned["table"] == table["path"]
    assert tuned["variant"] == next(e["variant"] for e in table["entries"] if e["fp32"] == tuned["use_fp32_acc"])
    assert select("--default")["table"] == "default"
    assert f"table: tuned ({table['path']})" in select(as_json=False)
    assert "table: default (DESIGN.md section 4)" in select("--default", as_json=False)


def test_a_table_for_another_device_or_version_is_ignored(cache):
    table = tune.tune("cpu", weights=small(), batches=(1,), repeats=1)
    data = json.load(open(table["path"]))
    data["key"][2] = "0.0.0"
    json.dump(data, open(table["path"], "w"))
    assert tune.load("cpu") is None
    np.testing.assert_equal(mm.api.resolve_kernel(1, small(), use_fp32_acc=True).rule.startswith("tuned"), False)


def test_cuda_bench_table_says_when_a_tuned_table_chose():
    from metal_moe import bench_cuda

    def row(batch, variant, table):
        return {"batch": batch, "variant": variant, "time_s": 1e-5, "weight_gbps": 1.0, "ceiling_fraction": 0.1,
                "tflops": 1.0, "policy_choice": table is not None, "table": table}

    res = {"weights": "W", "device": "D", "sms": 1, "copy_ceiling_gbps": 1.0, "results": [
        row(1, policy.DECODE + "_6_2_3", "/t.json"),
        row(1, policy.DECODE, None),
        row(2, policy.PREFILL4, "/t.json"),
        row(64, policy.GENERAL, "default")]}
    lines = bench_cuda.table(res).splitlines()
    assert [line for line in lines if line.startswith("# policy")] == \
        ["# policy: tuned table /t.json where it has a measurement, else the default table"]
    res["results"] = res["results"][1:2] + res["results"][3:]
    assert not any(line.startswith("# policy") for line in bench_cuda.table(res).splitlines())
