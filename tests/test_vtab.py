"""The VTAB trainer: task folders, VTAB-offline, short runs, resume, the suite and two processes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import psoft_vision as pv
from train.offline import data as offline_data
from train.vtab import combine as vtab_combine
from train.vtab import suite as vtab_suite
from train.vtab import trainer as vtab
from train.vtab.data import Preprocess, folder_splits
from train.vtab.folder import VTABFolderError, read_list, write_folder

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parent.parent
PREPROCESS = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def make_folder(root: Path, classes=3) -> Path:
    """A VTAB-1k task folder of 20x20 images whose grey level encodes the label."""
    def split(n):
        labels = np.arange(n) % classes
        return np.repeat(40 * labels, 20 * 20 * 3).astype(np.uint8).reshape(n, 20, 20, 3), labels

    return write_folder(root, {"train800": split(9), "val200": split(3), "test": split(6)})


def test_folder_loader_reads_resizes_and_normalises(tmp_path):
    folder = make_folder(tmp_path / "task")
    train, val, test, classes = folder_splits(folder, "train800", "val200", PREPROCESS)
    assert (len(train), len(val), len(test), classes) == (9, 3, 6, 3)
    x, y = train[4]
    assert x.shape == (3, 32, 32) and y == 1
    assert torch.allclose(x, torch.full_like(x, (40 / 255 - 0.5) / 0.5), atol=1e-6)
    train, val, _, _ = folder_splits(folder, "train800val200", None, PREPROCESS)
    assert len(train) == 12 and val is None


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "test.txt").unlink(), r"test\.txt is missing"),
    (lambda f: (f / "val200.txt").write_text("images/val200/000000.png\n"), r"val200\.txt:1: expected"),
    (lambda f: (f / "val200.txt").write_text("images/val200/000000.png cat\n"), r"val200\.txt:1: expected"),
    (lambda f: (f / "val200.txt").write_text("images/val200/000000.png -1\n"), "label -1 is outside 0"),
    (lambda f: (f / "images/test/000002.png").unlink(), r"1 listed images do not exist.*000002"),
    (lambda f: (f / "test.txt").write_text("images/test/000000.png 7\n"), r"labels \[7\].*never"),
    (lambda f: (f / "train800.txt").write_text(""), "lists no images"),
])
def test_bad_folders_are_named_errors(tmp_path, breakage, message):
    folder = make_folder(tmp_path / "task")
    breakage(folder)
    with pytest.raises(VTABFolderError, match=message):
        folder_splits(folder, "train800", "val200", PREPROCESS)


def test_not_a_folder(tmp_path):
    with pytest.raises(VTABFolderError, match="not a folder"):
        read_list(tmp_path / "nowhere", "train800")


def test_offline_tasks_have_the_vtab_shape_and_are_deterministic():
    for name, task in offline_data.TASKS.items():
        sizes = {}
        for split in offline_data.SPLIT_SIZES:
            images, labels = offline_data.task_split(name, split)
            assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
            assert labels.min() >= 0 and labels.max() < len(task.classes)
            sizes[split] = len(labels)
        assert sizes == {"train800": 800, "val200": 200, "test": 2000}
    first = offline_data.task_split("count", "test")[0].tobytes()
    offline_data.task_split.cache_clear()
    assert hashlib.sha256(offline_data.task_split("count", "test")[0].tobytes()).digest() == \
        hashlib.sha256(first).digest()


def test_offline_splits_draw_on_disjoint_material():
    pools = [set(offline_data._pool(10_000, split, seed=11)) for split in offline_data.SPLIT_SIZES]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
    fashion, _ = offline_data.fashion_mnist("test")
    train = {img.tobytes() for img in offline_data.task_split("rotation", "train800")[0]}
    assert not train & {img.tobytes() for img in offline_data.task_split("rotation", "test")[0]}
    assert fashion.shape == (10_000, 28, 28)


def test_exported_offline_task_reads_back_through_the_folder_loader(tmp_path):
    folder = offline_data.export_vtab_folder("scale", tmp_path)
    train, _, test, classes = folder_splits(folder, "train800", "val200", PREPROCESS)
    images, labels = offline_data.task_split("scale", "test")
    x, y = test[17]
    assert classes == 5 and len(train) == 800 and y == labels[17]
    expected = PREPROCESS(torch.from_numpy(images[17].copy()).permute(2, 0, 1))
    assert torch.equal(x, expected)


def short(tmp_path, *more) -> list[str]:
    return ["--task", "rotation", "--epochs", "2", "--quiet", "--output-dir", str(tmp_path), *more]


def test_short_run_beats_its_starting_accuracy_and_saves_everything(tmp_path):
    metrics = vtab.main(short(tmp_path, "--lr", "5e-3"))
    assert metrics["test_acc"] > metrics["start_val"] + 0.15, metrics
    assert metrics["best_val"] > metrics["start_val"] + 0.15
    for name in ("metrics.json", "metrics.csv", "curve.png", "adapter.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]
    rank, params = 24, 6 * 4
    assert metrics["trainable"] == params * (rank * (rank - 1) // 2 + 2 * rank)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    whole = vtab.main(short(tmp_path / "whole"))
    cut = vtab.main(short(tmp_path / "cut", "--stop-after-epochs", "1"))
    assert cut["finished"] is False and cut["epoch"] == 1
    resumed = vtab.main(short(tmp_path / "cut", "--resume"))
    def timeless(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert timeless(resumed["history"]) == timeless(whole["history"])
    assert resumed["test_acc"] == whole["test_acc"]
    a, b = load_file(tmp_path / "whole/adapter.safetensors"), load_file(tmp_path / "cut/adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_suite_runs_every_method_writes_reports_and_skips_finished_runs(tmp_path):
    argv = ["--out", str(tmp_path), "--tasks", "count", "--seeds", "0", "--extra", "--epochs 1"]
    vtab_suite.main(argv)
    rows = list((tmp_path / "results.csv").read_text().splitlines())
    assert len(rows) == 1 + len(vtab.METHODS)
    summary = (tmp_path / "summary.md").read_text()
    assert all(label in summary for label in vtab_suite.LABELS.values())
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 10_000
    trainable = {m: json.loads((tmp_path / "count" / f"{m}-seed0" / "metrics.json").read_text())["trainable"]
                 for m in vtab.METHODS}
    assert trainable["linear"] == 0 and trainable["psoft"] <= trainable["lora"] / 10
    assert trainable["psoft"] == trainable["peft-psoft"]
    stamp = (tmp_path / "count" / "psoft-seed0" / "metrics.json").stat().st_mtime_ns
    vtab_suite.main(argv)
    assert (tmp_path / "count" / "psoft-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(vtab_suite.StaleRunError, match="epochs"):
        vtab_suite.main(argv[:-1] + ["--epochs 2"])

    # the same folder twice under two labels: each row is the suite's own, renamed
    table = vtab_combine.main([f"{tmp_path}=fp32 base", f"{tmp_path}=again", "--tasks", "count",
                               "--chart", str(tmp_path / "combined.png")])
    ours = next(line for line in summary.splitlines() if line.startswith("| ours PSOFT |"))
    for suffix in ("fp32 base", "again"):
        assert ours.replace("| ours PSOFT |", f"| ours PSOFT, {suffix} |") in table
    assert (tmp_path / "combined.png").stat().st_size > 10_000


@pytest.mark.multiprocess
def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
    common = ["-m", "train.vtab", "--task", "location", "--epochs", "1", "--adapter-dropout", "0", "--quiet",
              "--batch-size", "32", "--cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # accelerate's --cpu launcher starts one process unless mpirun is there; --multi_gpu starts torchrun, and the
    # trainer's --cpu then makes it a gloo group of CPU processes.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    subprocess.run([*launch, *common, "--output-dir", str(tmp_path / "two")], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one")], check=True, cwd=ROOT,
                   env=env, capture_output=True)
    two = json.loads((tmp_path / "two/metrics.json").read_text())
    one = json.loads((tmp_path / "one/metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert len(set(two["rank_checksums"])) == 1, two["rank_checksums"]
    a, b = load_file(tmp_path / "two/adapter.safetensors"), load_file(tmp_path / "one/adapter.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert abs(two["test_acc"] - one["test_acc"]) <= 0.002


def test_task_folder_and_final_protocol_through_the_trainer(tmp_path):
    folder = offline_data.export_vtab_folder("scale", tmp_path / "data")
    metrics = vtab.main(["--data-dir", str(folder), "--protocol", "final", "--epochs", "1", "--quiet",
                         "--method", "linear", "--output-dir", str(tmp_path / "run")])
    assert metrics["classes"] == 5 and metrics["best_val"] is None and metrics["start_val"] is None
    assert len(metrics["history"]) == 1 and 0 <= metrics["test_acc"] <= 1
    assert (tmp_path / "run" / "trainable.safetensors").is_file()


def test_local_weights_file_loads_the_shipped_backbone(tmp_path):
    from train.offline.backbone import BACKBONE_FILE

    args = vtab.parse_args(["--model", "vit_pico_patch8_32", "--weights", str(BACKBONE_FILE)])
    from_file = vtab.create_model(args, num_classes=3).state_dict()
    from_tag = vtab.create_model(vtab.parse_args([]), num_classes=3).state_dict()
    shipped = load_file(BACKBONE_FILE)
    assert all(torch.equal(from_file[k], shipped[k].float()) for k in shipped if not k.startswith("head."))
    assert all(torch.equal(from_file[k], from_tag[k]) for k in shipped if not k.startswith("head."))
    with pytest.raises(FileNotFoundError, match="--weights"):
        vtab.create_model(vtab.parse_args(["--weights", str(tmp_path / "missing.safetensors")]), num_classes=3)


# ------------------------------------------------------------------------------------- --grad-checkpointing, --compile
def flag_run(folder: Path, out: Path, *flags) -> dict:
    """Two epochs on a 9-image task folder, every batch of 3 (one shape: --compile compiles once per mode)."""
    return vtab.main(["--data-dir", str(folder), "--epochs", "2", "--batch-size", "3", "--eval-batch-size", "3",
                      "--quiet", "--output-dir", str(out), *flags])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The task folder, and the run without flags: its metrics and adapter tensors."""
    folder = make_folder(tmp_path_factory.mktemp("flags") / "task")
    out = tmp_path_factory.mktemp("plain")
    return folder, flag_run(folder, out), load_file(out / "adapter.safetensors")


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_grad_checkpointing_checkpoints_and_trains_bit_identically(plain_run, tmp_path, monkeypatch):
    """The recomputed activations are the same numbers (the dropout masks too: torch restores the random state), so
    the run is bit-identical; counting timm's calls of torch.utils.checkpoint shows the flag did something."""
    folder, plain, adapter = plain_run
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    metrics = flag_run(folder, tmp_path, "--grad-checkpointing")
    assert len(calls) >= 2 * 3 * 6  # epochs x batches x blocks (timm checkpoints each block)
    assert timeless(metrics["history"]) == timeless(plain["history"]) and metrics["test_acc"] == plain["test_acc"]
    checkpointed = load_file(tmp_path / "adapter.safetensors")
    assert checkpointed.keys() == adapter.keys() and all(torch.equal(checkpointed[k], adapter[k]) for k in adapter)


def test_grad_checkpointing_is_refused_where_timm_has_none(monkeypatch):
    import timm

    with pytest.raises(vtab.TrainerFlagError, match=r"--grad-checkpointing: dla46_c \(DLA\) has no gradient"):
        vtab.enable_grad_checkpointing(timm.create_model("dla46_c", pretrained=False), "dla46_c")
    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(vtab.TrainerFlagError, match="TIMM_REENTRANT_CKPT"):
        vtab.enable_grad_checkpointing(vtab.create_model(vtab.parse_args([]), num_classes=3), "vit_pico_patch8_32")


def test_compile_trains_the_eager_run_up_to_float_reassociation(plain_run, tmp_path, monkeypatch):
    """torch.compile (inductor, on the CPU) fuses and reorders float sums, so the numbers differ in the last bits:
    measured 8e-7 at most on adapter values up to 5 after two epochs, the losses within 1e-7. The tolerance, 1e-5,
    leaves room for other CPUs' kernels; dropout masks of its own (what compile_model prevents) moved the
    adapter by 0.12 in three epochs."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", False)  # restored after the test
    folder, plain, adapter = plain_run
    metrics = flag_run(folder, tmp_path, "--compile")
    assert [r["train_loss"] for r in metrics["history"]] == pytest.approx(
        [r["train_loss"] for r in plain["history"]], rel=1e-5)
    assert metrics["test_acc"] == plain["test_acc"] and metrics["best_epoch"] == plain["best_epoch"]
    compiled = load_file(tmp_path / "adapter.safetensors")
    assert compiled.keys() == adapter.keys()
    for key in adapter:
        torch.testing.assert_close(compiled[key], adapter[key], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- --quantize
@pytest.mark.parametrize("method", ["psoft", "oft", "qlora"])
def test_quantized_bases_train_resume_and_save(plain_run, tmp_path, method):
    """QPSOFT, QOFT and PEFT's QLoRA on an NF4 base: they learn, an interrupted run resumes exactly, and ours
    save an adapter that records the quantization."""
    folder, _, _ = plain_run
    quantize = [] if method == "qlora" else ["--quantize", "nf4"]  # qlora quantizes to nf4 by itself
    whole = flag_run(folder, tmp_path / "whole", "--method", method, *quantize)
    assert whole["args"]["quantize"] == "nf4" and whole["finished"]
    flag_run(folder, tmp_path / "cut", "--method", method, *quantize, "--stop-after-epochs", "1")
    resumed = flag_run(folder, tmp_path / "cut", "--method", method, *quantize, "--resume")
    assert timeless(resumed["history"]) == timeless(whole["history"])
    if method != "qlora":
        header, _ = pv.read_adapter(tmp_path / "whole" / "adapter.safetensors")
        assert {layer["quantization"] for layer in header["layers"].values()} == {"bnb-nf4"}
        a, b = (load_file(tmp_path / run / "adapter.safetensors") for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_quantized_base_cannot_be_trained_in_full(tmp_path):
    with pytest.raises(vtab.TrainerFlagError, match="--quantize nf4 with --method full"):
        vtab.main(short(tmp_path, "--method", "full", "--quantize", "nf4"))
