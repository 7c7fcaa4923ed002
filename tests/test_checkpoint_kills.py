"""Kill real training runs after every file operation of their checkpoint writes, resume them, and get the
uninterrupted run's result bit for bit (issue 17).

``PSOFT_VISION_KILL_AT=n`` makes train/common/checkpoint.py end the process (``os._exit``) right after the n-th file
operation of its checkpoint writes. Each killed run is a process of its own, forked from this test process, which
has imported the trainers once (a fresh interpreter per kill point would spend most of the sweep importing torch):
the child calls the trainer's ``main`` with the command line, as ``python -m train.vtab`` does, and dies at the
operation. Two tests run the real command lines (``python -m train.vtab``, ``python -m train.dreambooth``) instead.
Every resume then runs here and must equal the uninterrupted reference: the same metrics (less times) and
bit-identical adapter tensors, with no leftover ``checkpoint.tmp`` or ``checkpoint.old``.
"""

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from test_dreambooth import class_dir, cli, pipe_dir, subject_dir  # noqa: F401  (fixtures)
from test_resume import assert_same_result, task, vtab_argv  # noqa: F401  (task: a fixture)

import psoft_vision as pv
from train.common.checkpoint import KILL_AT_ENV, KILL_LOG_ENV, KILLED_EXIT_CODE
from train.dreambooth import trainer as dreambooth
from train.vtab import trainer as vtab

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread", "no_curve")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def no_curve():
    """The VTAB trainer's curve.png is output only, and drawing it takes a third of a run this small."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vtab, "_plot", lambda *args: None)
        yield


def write(first: bool, best: bool) -> list[str]:
    """The file operations of one checkpoint write (see train/common/checkpoint.py)."""
    ops = ["save_state checkpoint.tmp", "write trainer_state.json", "write run_args.json",
           *(["write best.safetensors"] if best else []), "seal checkpoint.tmp"]
    if not first:
        ops.append("rename checkpoint -> checkpoint.old")
    ops.append("rename checkpoint.tmp -> checkpoint")
    if not first:
        ops += ["unseal checkpoint.old", "remove checkpoint.old"]
    return ops


#: a three-epoch VTAB run checkpoints after each epoch, its best tensors included
VTAB_OPERATIONS = write(True, True) + write(False, True) + write(False, True)
#: a three-step DreamBooth run checkpointing every step
DREAMBOOTH_OPERATIONS = write(True, False) + write(False, False) + write(False, False)


def fork_run(main, argv: list[str], kill_at: int | None = None, log: Path | None = None) -> int:
    """``main(argv)`` in a forked child with the kill hook's variables set; its exit code (KILLED_EXIT_CODE when
    the hook ended it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.environ.update({KILL_AT_ENV: str(kill_at)} if kill_at is not None else {})
            os.environ.update({KILL_LOG_ENV: str(log)} if log is not None else {})
            main(argv)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def operations(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def checkpoint_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))


def kill_then_resume(main, argv: list[str], resume: list[str], kill_at: int) -> None:
    """Run ``argv`` killed after operation ``kill_at``, then resume it here to the end."""
    code = fork_run(main, argv, kill_at)
    assert code == KILLED_EXIT_CODE, f"the run was to die after operation {kill_at}, but exited with {code}"
    main(argv + resume)


# ------------------------------------------------------------------------------------------------------- VTAB
@pytest.fixture(scope="module")
def vtab_reference(task, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted run, logging its file operations."""
    out = tmp_path_factory.mktemp("vtab-reference")
    assert fork_run(vtab.main, vtab_argv(task, out), log=out.parent / "vtab-operations.log") == 0
    return out


def test_vtab_checkpoints_are_written_in_the_documented_operations(vtab_reference):
    assert operations(vtab_reference.parent / "vtab-operations.log") == VTAB_OPERATIONS
    assert checkpoint_folders(vtab_reference) == ["checkpoint"]


@pytest.mark.parametrize("kill_at", range(1, len(VTAB_OPERATIONS) + 1),
                         ids=[f"{i}-{op.replace(' ', '-')}" for i, op in enumerate(VTAB_OPERATIONS, 1)])
def test_vtab_killed_after_any_file_operation_resumes_exactly(kill_at, task, vtab_reference, tmp_path):  # noqa: F811
    kill_then_resume(vtab.main, vtab_argv(task, tmp_path), ["--resume"], kill_at)
    assert_same_result(tmp_path, vtab_reference)
    assert checkpoint_folders(tmp_path) == ["checkpoint"]


#: kills in the second write that leave more than a checkpoint behind; the resumed run must clear each leftover
LEFTOVERS = {VTAB_OPERATIONS.index(op, 7) + 1: what for op, what in [
    ("seal checkpoint.tmp", "a sealed checkpoint.tmp beside the checkpoint"),
    ("rename checkpoint -> checkpoint.old", "a sealed checkpoint.tmp and checkpoint.old, no checkpoint"),
    ("rename checkpoint.tmp -> checkpoint", "the checkpoint and a sealed checkpoint.old"),
    ("unseal checkpoint.old", "the checkpoint and an unsealed checkpoint.old"),
]}


@pytest.mark.parametrize("first", LEFTOVERS, ids=list(LEFTOVERS.values()))
def test_vtab_killed_again_while_clearing_a_kills_leftovers_resumes_exactly(first, task, vtab_reference,  # noqa: F811
                                                                           tmp_path):
    """Kill after operation ``first``; the resume clears the leftovers once it has loaded the newest checkpoint
    (train/common/checkpoint.py's _settle). Kill it after each of those operations in turn, and resume once more.
    (The operations of its own checkpoint write are those the sweep above kills at.)"""
    state = tmp_path / "state"
    assert fork_run(vtab.main, vtab_argv(task, state), first) == KILLED_EXIT_CODE
    died_after = []
    while not died_after or not died_after[-1].startswith("save_state"):
        out, log = tmp_path / f"killed-{len(died_after) + 1}", tmp_path / f"killed-{len(died_after) + 1}.log"
        shutil.copytree(state, out)
        code = fork_run(vtab.main, vtab_argv(task, out, "--resume"), len(died_after) + 1, log)
        assert code == KILLED_EXIT_CODE, code
        died_after.append(operations(log)[-1])
        vtab.main(vtab_argv(task, out, "--resume"))
        assert_same_result(out, vtab_reference)
        assert checkpoint_folders(out) == ["checkpoint"], died_after
    assert len(died_after) > 1 and all(op.startswith(("rename", "unseal", "remove")) for op in died_after[:-1])


def test_the_vtab_command_killed_between_the_swap_and_the_removal_of_the_old_checkpoint(task, vtab_reference,  # noqa: F811
                                                                                      tmp_path):
    """The real command line, killed where every later resume used to fail ("Directory not empty"), resumed by the
    real command line."""
    command = [sys.executable, "-m", "train.vtab", *vtab_argv(task, tmp_path)]
    kill_at = VTAB_OPERATIONS.index("rename checkpoint.tmp -> checkpoint", 7) + 1
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run(command, cwd=ROOT, env={**env, KILL_AT_ENV: str(kill_at)}, capture_output=True)
    assert killed.returncode == KILLED_EXIT_CODE, killed.stderr.decode()[-2000:]
    assert checkpoint_folders(tmp_path) == ["checkpoint", "checkpoint.old"]
    subprocess.run([*command, "--resume"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert_same_result(tmp_path, vtab_reference)


# ------------------------------------------------------------------------------------------------- DreamBooth
def dreambooth_argv(pipe_dir, subject_dir, class_dir, out: Path) -> list[str]:  # noqa: F811
    return cli(pipe_dir, subject_dir, class_dir, out, "--max_train_steps", 3, "--checkpointing_steps", 1,
               "--validation_steps", 100, "--num_validation_images", 1, "--lr_warmup_steps", 1)


@pytest.fixture(scope="module")
def dreambooth_run(pipe_dir, subject_dir, class_dir, tmp_path_factory):  # noqa: F811
    """The command line of a run in a given folder, and an uninterrupted run's folder (which logged its file
    operations, and made the class images every run shares)."""
    def argv(out: Path) -> list[str]:
        return dreambooth_argv(pipe_dir, subject_dir, class_dir, out)

    out = tmp_path_factory.mktemp("dreambooth-reference")
    assert fork_run(dreambooth.main, argv(out), log=out.parent / "dreambooth-operations.log") == 0
    return argv, out


def assert_same_dreambooth_result(out: Path, reference: Path) -> None:
    """The same losses and learning rates, and bit-identical adapter and LoRA tensors."""
    history = [json.loads((p / "metrics.json").read_text())["history"] for p in (out, reference)]
    assert history[0] == history[1]
    (header, tensors), (expected_header, expected) = (pv.read_adapter(p / "adapter.safetensors")
                                                      for p in (out, reference))
    assert header == expected_header and all(torch.equal(tensors[k], expected[k]) for k in expected)
    from safetensors.torch import load_file

    lora, expected_lora = (load_file(p / "lora" / "pytorch_lora_weights.safetensors") for p in (out, reference))
    assert lora.keys() == expected_lora.keys() and all(torch.equal(lora[k], expected_lora[k]) for k in lora)


def test_dreambooth_checkpoints_are_written_in_the_documented_operations(dreambooth_run):
    _, reference = dreambooth_run
    assert operations(reference.parent / "dreambooth-operations.log") == DREAMBOOTH_OPERATIONS


@pytest.mark.parametrize("kill_at", range(1, len(DREAMBOOTH_OPERATIONS) + 1),
                         ids=[f"{i}-{op.replace(' ', '-')}" for i, op in enumerate(DREAMBOOTH_OPERATIONS, 1)])
def test_dreambooth_killed_after_any_file_operation_resumes_exactly(kill_at, dreambooth_run, tmp_path):
    argv, reference = dreambooth_run
    kill_then_resume(dreambooth.main, argv(tmp_path), ["--resume_from_checkpoint", "latest"], kill_at)
    assert_same_dreambooth_result(tmp_path, reference)
    assert checkpoint_folders(tmp_path) == ["checkpoint"]


def test_the_dreambooth_command_killed_between_the_swap_and_the_removal_of_the_old_checkpoint(dreambooth_run,
                                                                                             tmp_path):
    argv, reference = dreambooth_run
    kill_at = DREAMBOOTH_OPERATIONS.index("rename checkpoint.tmp -> checkpoint", 6) + 1
    env = dict(os.environ, OMP_NUM_THREADS="1", **{KILL_AT_ENV: str(kill_at)})
    killed = subprocess.run([sys.executable, "-m", "train.dreambooth", *argv(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True)
    assert killed.returncode == KILLED_EXIT_CODE, killed.stderr.decode()[-2000:]
    assert checkpoint_folders(tmp_path) == ["checkpoint", "checkpoint.old"]
    dreambooth.main(argv(tmp_path) + ["--resume_from_checkpoint", "latest"])
    assert_same_dreambooth_result(tmp_path, reference)
    assert checkpoint_folders(tmp_path) == ["checkpoint"]
