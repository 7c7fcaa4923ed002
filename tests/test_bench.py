"""The benchmark driver end to end on a seconds-long workload: processes, table, JSON, CSV and chart."""

import csv
import json
import re

import pytest
from helpers import DIAG

import bench
import psoft_vision as pv

pytestmark = pytest.mark.bench


def test_bench_runs_each_configuration_and_writes_its_reports(tmp_path, capsys):
    bench.main(["--workloads", "test-vit", "--methods", "floor,psoft,peft-lora", "--steps", "2", "--warmup", "1",
                "--repeats", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results] == ["floor", "psoft", "peft-lora"]
    assert all("error" not in r and r["runs"] == 2 and len(r["step_ms_all"]) == 4 for r in results)
    by = {r["method"]: r for r in results}
    assert by["floor"]["trainable"] == 0
    assert by["psoft"]["trainable"] < by["peft-lora"]["trainable"]
    assert by["psoft"]["adapter_bytes"] > 0 and by["psoft"]["infer_merged_ms"] > 0
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text().count("\n") == 5
    assert "x floor" in capsys.readouterr().out


def test_quantized_configurations_report_their_base_and_compare_with_qlora(tmp_path):
    bench.main(["--workloads", "test-vit", "--methods", "psoft,qpsoft,qoft,peft-qlora", "--steps", "1", "--warmup",
                "1", "--out", str(tmp_path)])
    by = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert all("error" not in r for r in by.values()), by
    assert by["psoft"]["base"] == "float" and {by[m]["base"] for m in ("qpsoft", "qoft", "peft-qlora")} == {"bnb-nf4"}
    assert by["qpsoft"]["base_mib"] < by["psoft"]["base_mib"] / 3  # 4-bit blocks and their scales
    assert by["qpsoft"]["infer_merged_ms"] is None  # a quantized base is not merged into
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "base MiB" in header


def test_a_failing_configuration_is_reported_not_fatal():
    results = [bench.pool([dict(workload="w", method="m", error="boom")])]
    assert results[0]["error"] == "boom"
    assert "error: boom" in bench.table(results)


def test_svd_report_times_both_modes_and_the_lowrank_error():
    text = bench.svd_report(["test-vit"])
    assert re.fullmatch(r"test-vit: \d+ layers at rank 46: full [\d.]+ s, lowrank [\d.]+ s; "
                        r"lowrank error median [\d.e+-]+, worst [\d.e+-]+", text)


def test_ops_per_step_meet_the_targets_with_no_sync(tmp_path):
    """The ops a training step dispatches (deterministic: what bounds a GPU step of small adapters) against PEFT's
    LoRA on the same layers: PSOFT <= 0.9x, PSOFT-Neumann and OFTv2 <= 1.0x, and no method waits for the device."""
    bench.main(["--workloads", "test-vit", "--methods", "floor,psoft,psoft-neumann,oft,peft-lora", "--steps", "1",
                "--warmup", "1", "--out", str(tmp_path)])
    by = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    lora = by["peft-lora"]["step_ops"]
    assert by["floor"]["step_ops"] < by["psoft"]["step_ops"] <= 0.9 * lora
    assert by["psoft-neumann"]["step_ops"] <= lora and by["oft"]["step_ops"] <= lora
    assert {r["step_syncs"] for r in by.values()} == {0}
    assert "ops/step" in (tmp_path / "results.md").read_text().splitlines()[0]


def test_a_method_registered_by_a_test_is_measured():
    """tests/helpers.py's Diag, registered here alone (tests/test_registry.py follows it through the trainers)."""
    pv.register_method(DIAG)
    try:
        assert "diag" in bench.methods.methods()
        result = bench.run_config("test-vit", "diag", steps=1, warmup=1, device="cpu")
    finally:
        pv.unregister_method("diag")
    assert result["trainable"] > 0 and result["adapter_bytes"] > 0 and result["infer_merged_ms"] > 0
