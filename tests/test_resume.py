"""Resuming a run (issue 17, "no silent wrongness"): a damaged checkpoint, a leftover of an interrupted swap and a
contradicting argument each end in the exact result or a named error that leaves the run folder as it was.

The runs are the VTAB trainer on the shipped offline backbone and a 9-image task folder (three epochs of three
steps, well under a second each), and the DreamBooth trainer on a tiny pipeline for two steps."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dreambooth import class_dir, cli, pipe_dir, subject_dir  # noqa: F401  (fixtures)
from test_vtab import make_folder

import psoft_vision as pv
from train.common.checkpoint import CheckpointError, find_checkpoint
from train.common.resume_args import ResumeArgumentError
from train.dreambooth import trainer as dreambooth
from train.vtab import trainer as vtab

pytestmark = [pytest.mark.trainer, pytest.mark.usefixtures("one_thread")]
EPOCHS = 3
#: metrics.json fields that hold times or say where and how the run was invoked, not what it computed
UNCOMPARED = {"setup_s", "train_s", "peak_mib", "saved", "resumes"}


def vtab_argv(task: Path, out: Path, *more) -> list[str]:
    return ["--data-dir", str(task), "--epochs", str(EPOCHS), "--batch-size", "4", "--quiet", "--cpu",
            "--output-dir", str(out), *map(str, more)]


def computed(out: Path, uncompared_args=()) -> dict:
    """metrics.json less what differs between equal runs (times, the output folder, --resume, ``uncompared_args``)."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = {k: v for k, v in metrics.items() if k not in UNCOMPARED}
    metrics["history"] = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]
    skip = {"output_dir", "resume", *uncompared_args}
    metrics["args"] = {k: v for k, v in metrics["args"].items() if k not in skip}
    return metrics


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: equal snapshots, an untouched folder."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_result(out: Path, reference: Path, uncompared_args=()) -> None:
    """The same metrics (less times), and the same adapter: header and bit-identical tensors (not the same bytes:
    safetensors writes the metadata's keys in no fixed order)."""
    assert computed(out, uncompared_args) == computed(reference, uncompared_args)
    header, tensors = pv.read_adapter(out / "adapter.safetensors")
    expected_header, expected = pv.read_adapter(reference / "adapter.safetensors")
    assert header == expected_header and tensors.keys() == expected.keys()
    assert all(tensors[k].dtype == expected[k].dtype and torch.equal(tensors[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("vtab") / "task")


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    vtab.main(vtab_argv(task, out))
    return out


@pytest.fixture(scope="module")
def cut_run(task, tmp_path_factory) -> Path:
    """A run stopped after its first epoch; tests damage copies of it."""
    out = tmp_path_factory.mktemp("cut")
    vtab.main(vtab_argv(task, out, "--stop-after-epochs", 1))
    return out


@pytest.fixture
def cut(cut_run, tmp_path) -> Path:
    shutil.copytree(cut_run, tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def empty(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


DAMAGE = {
    "random states deleted": (lambda c: (c / "random_states_0.pkl").unlink(), r"random_states_0\.pkl is missing"),
    "random states truncated": (lambda c: truncate(c / "random_states_0.pkl"),
                                r"random_states_0\.pkl has \d+ bytes where the manifest says \d+"),
    "trainer state deleted": (lambda c: (c / "trainer_state.json").unlink(), r"trainer_state\.json is missing"),
    "checkpoint emptied": (empty, r"checkpoint is empty: it is not a whole checkpoint"),
    "model truncated": (lambda c: truncate(c / "model.safetensors"), r"model\.safetensors has \d+ bytes"),
    "best tensors truncated": (lambda c: truncate(c / "best.safetensors"), r"best\.safetensors has \d+ bytes"),
    "optimizer byte flipped": (lambda c: flip_a_byte(c / "optimizer.bin"),
                               r"optimizer\.bin does not match its sha256"),
    "manifest deleted (an older trainer's checkpoint)": (lambda c: (c / "manifest.json").unlink(),
                                                         r"has no manifest\.json"),
    "manifest truncated": (lambda c: truncate(c / "manifest.json"), r"manifest\.json is not a readable manifest"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_a_named_error_and_the_folder_is_left_as_it_was(damage, cut, task):
    breakage, message = DAMAGE[damage]
    breakage(cut / "checkpoint")
    before = snapshot(cut)
    with pytest.raises(CheckpointError, match=message) as error:
        vtab.main(vtab_argv(task, cut, "--resume"))
    assert f"Restore the files, or delete {cut / 'checkpoint'} to start the run again" in str(error.value)
    assert snapshot(cut) == before


def test_leftover_old_checkpoint_of_a_kill_after_the_swap_resumes_exactly(cut, task, reference):
    """The kill between the swap and the removal of checkpoint.old, which made every later resume fail with
    "Directory not empty" when the next checkpoint was swapped in."""
    shutil.copytree(cut / "checkpoint", cut / "checkpoint.old")
    vtab.main(vtab_argv(task, cut, "--resume"))
    assert_same_result(cut, reference)
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_an_unfinished_first_checkpoint_is_no_checkpoint(tmp_path, cut, task, reference):
    """An unsealed checkpoint.tmp alone is a first write that was cut short: --resume starts the run, exactly."""
    (cut / "checkpoint").rename(cut / "checkpoint.tmp")
    (cut / "checkpoint.tmp" / "manifest.json").unlink()
    assert find_checkpoint(cut) is None
    vtab.main(vtab_argv(task, cut, "--resume"))
    assert_same_result(cut, reference)


def test_resume_without_any_checkpoint_starts_the_run(tmp_path, task, reference, capsys):
    vtab.main(vtab_argv(task, tmp_path, "--resume"))
    assert "no checkpoint" in capsys.readouterr().out
    assert_same_result(tmp_path, reference)


@pytest.mark.parametrize("given, message", [
    (("--lr", 0.5), r"--lr 0\.5 \(the run: --lr 0\.02\).*Continue it with the run's values \(--lr 0\.02\)"),
    (("--epochs", 5), r"--epochs 5 \(the run: --epochs 3\)"),
    (("--seed", 1, "--batch-size", 3), r"--batch-size 3 \(the run: --batch-size 4\); --seed 1 \(the run: --seed 0\)"),
    (("--no-pretrained",), r"--no-pretrained \(the run: --pretrained\)"),
    (("--train-modules", "norm"), r"--train-modules norm \(the run: without --train-modules\)"),
    (("--eval-batch-size", 2), r"--eval-batch-size 2"),
    (("--grad-checkpointing", "--compile"), r"--compile \(the run: without --compile\)"),
])
def test_arguments_that_contradict_the_checkpoint_are_refused(given, message, cut, task):
    before = snapshot(cut)
    with pytest.raises(ResumeArgumentError, match=message):
        vtab.main(vtab_argv(task, cut, "--resume", *given))
    assert snapshot(cut) == before


def test_output_only_arguments_may_differ_and_are_recorded(cut_run, cut, task, reference):
    """--num-workers and --grad-checkpointing (bit-identical: tests/test_vtab.py) changed, and the run folder moved
    (``cut`` is a copy of ``cut_run``): all three are recorded."""
    vtab.main(vtab_argv(task, cut, "--resume", "--num-workers", 1, "--grad-checkpointing"))
    assert_same_result(cut, reference, uncompared_args=["num_workers", "grad_checkpointing"])
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["args"]["num_workers"] == 1 and metrics["args"]["grad_checkpointing"] is True
    changed = {"grad_checkpointing": {"from": False, "to": True}, "num_workers": {"from": 0, "to": 1},
               "output_dir": {"from": str(cut_run), "to": str(cut)}}
    assert metrics["resumes"] == [{"epoch": 1, "changed": changed}]


def test_another_process_count_is_refused(cut, task):
    manifest = json.loads((cut / "checkpoint" / "manifest.json").read_text())
    (cut / "checkpoint" / "manifest.json").write_text(json.dumps(dict(manifest, processes=2)))
    with pytest.raises(ResumeArgumentError, match=r"written by 2 process\(es\) and this run has 1"):
        vtab.main(vtab_argv(task, cut, "--resume"))


# ------------------------------------------------------------------------------------------------- DreamBooth
@pytest.fixture(scope="module")
def dreambooth_cut(pipe_dir, subject_dir, class_dir, tmp_path_factory):  # noqa: F811
    """The command line of a two-step run in a given folder, and a run of it stopped after its first step."""
    def argv(out: Path, *more) -> list[str]:
        return cli(pipe_dir, subject_dir, class_dir, out, "--validation_steps", 100, "--num_validation_images", 1,
                   *more)

    out = tmp_path_factory.mktemp("dreambooth-cut")
    dreambooth.main(argv(out, "--stop_after_steps", 1))
    return argv, out


@pytest.fixture
def dreambooth_copy(dreambooth_cut, tmp_path):
    argv, out = dreambooth_cut
    shutil.copytree(out, tmp_path / "run")
    return argv, tmp_path / "run"


def test_dreambooth_latest_with_a_damaged_checkpoint_is_a_named_error(dreambooth_copy):
    argv, out = dreambooth_copy
    (out / "checkpoint" / "random_states_0.pkl").unlink()
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl is missing"):
        dreambooth.main(argv(out, "--resume_from_checkpoint", "latest"))
    truncate(out / "checkpoint" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors has \d+ bytes"):  # a folder named explicitly
        dreambooth.main(argv(out, "--resume_from_checkpoint", out / "checkpoint"))
    truncated = {"checkpoint/model.safetensors": snapshot(out)["checkpoint/model.safetensors"]}
    assert snapshot(out) == {**before, **truncated}


def test_dreambooth_refuses_a_contradicting_learning_rate(dreambooth_copy):
    argv, out = dreambooth_copy
    before = snapshot(out)
    with pytest.raises(ResumeArgumentError, match=r"--learning_rate 0\.5 \(the run: --learning_rate 0\.01\)"):
        dreambooth.main(argv(out, "--resume_from_checkpoint", "latest", "--learning_rate", 0.5))
    assert snapshot(out) == before


def test_dreambooth_latest_without_a_checkpoint_starts_the_run(dreambooth_cut, tmp_path, capsys):
    argv, _ = dreambooth_cut
    assert dreambooth.main(argv(tmp_path, "--resume_from_checkpoint", "latest", "--max_train_steps", 1))["finished"]
    assert "no checkpoint" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_two_processes_stop_and_resume_exactly(task, tmp_path):
    """Two CPU processes (a gloo group, as tests/test_vtab.py launches them): each writes its own random states into
    the checkpoint, the main process seals it, and the resumed run equals the uninterrupted one. (--protocol final:
    twelve images, three global batches of four.)"""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train.vtab"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out: Path, *more) -> None:
        subprocess.run([*launch, *vtab_argv(task, out, "--protocol", "final", *more)], check=True,
                       cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True)

    run(tmp_path / "whole")
    run(tmp_path / "cut", "--stop-after-epochs", 1)
    manifest = json.loads((tmp_path / "cut" / "checkpoint" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"])
    run(tmp_path / "cut", "--resume")
    assert_same_result(tmp_path / "cut", tmp_path / "whole")
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["processes"] == 2
