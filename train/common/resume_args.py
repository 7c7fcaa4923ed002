"""The resume check: a run continues only with the arguments it was started with.

A checkpoint holds the optimiser's learning rates and weight decay, the schedule's position and the random states,
so an argument given anew on resume would either be silently overridden by the checkpoint (``--lr``) or change the
run halfway (``--epochs`` stretches the cosine schedule, ``--seed`` the batches); either way the result would be
neither run, and metrics.json would record an argument that was not what trained the model. So every argument is
compared with the checkpoint's ``run_args.json`` and a difference is a :class:`ResumeArgumentError`, except:

- the arguments that name this invocation only (``--resume``, ``--stop-after-epochs`` and the like), and
- each trainer's ``may_differ``: arguments that cannot change what is trained (logging, workers, where the output
  goes); a change of one is returned, so that the trainer records it beside the run's history.

Arguments a trainer adds later are compared too (against their default, for a checkpoint that predates them), so a
new flag is safe until someone decides it may differ.
"""

import argparse
import json
import shlex
from pathlib import Path

from .checkpoint import read_run_args, verify_checkpoint
from .metrics_files import recorded_args

#: Arguments that only say what this invocation does: never compared, never recorded.
PER_INVOCATION = frozenset({"resume", "resume_from_checkpoint", "stop_after_epochs", "stop_after_steps"})


class ResumeArgumentError(ValueError):
    """A resume asked for arguments that contradict the ones the run was started with, or another process count."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}  # argparse keeps its actions in _actions


def as_flag(action: argparse.Action | None, name: str, value) -> str:
    """How ``value`` reads on the command line: ``--lr 0.02``, ``--no-pretrained``, ``without --cpu``."""
    if action is None:
        return f"{name}={value!r}"
    option = action.option_strings[0]
    if action.nargs == 0:  # store_true or --x/--no-x
        if value or len(action.option_strings) == 1:
            return option if value else f"without {option}"
        return action.option_strings[1]
    if value is None or value == []:
        return f"without {option}"
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{option} {shlex.quote(text)}"


def _normalised(args) -> dict:
    """The arguments as run_args.json holds them (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(recorded_args(args)))


def compare_args(recorded: dict, args, parser: argparse.ArgumentParser, may_differ) -> tuple[dict, dict]:
    """``(contradictions, changes)``: each maps an argument to ``(recorded value, value now)``; a recorded run
    without an argument ran with its default."""
    now = _normalised(args)
    contradictions, changes = {}, {}
    for name, value in now.items():
        before = recorded[name] if name in recorded else parser.get_default(name)
        if name in PER_INVOCATION or before == value:
            continue
        (changes if name in may_differ else contradictions)[name] = (before, value)
    return contradictions, changes


def check_resume_args(folder: Path, args, parser: argparse.ArgumentParser, may_differ, processes: int,
                      request: str = "--resume") -> dict:
    """Refuse to continue ``folder``'s run with other arguments than its own (or another number of processes);
    returns the allowed changes (``may_differ`` arguments), ``{name: {"from": recorded, "to": now}}``."""
    written_by = verify_checkpoint(folder, contents=False)["processes"]
    if written_by != processes:
        raise ResumeArgumentError(
            f"{request}: {folder} was written by {written_by} process(es) and this run has {processes}; each process "
            f"keeps its own random numbers and share of the batch, so launch the resume with {written_by} (accelerate "
            f"launch --num_processes {written_by}), or give a new output folder for a new run")
    actions = _actions(parser)
    contradictions, changes = compare_args(read_run_args(folder), args, parser, may_differ)
    if contradictions:
        said = "; ".join(f"{as_flag(actions.get(n), n, now)} (the run: {as_flag(actions.get(n), n, before)})"
                         for n, (before, now) in sorted(contradictions.items()))
        fix = ", ".join(as_flag(actions.get(n), n, before) for n, (before, _) in sorted(contradictions.items()))
        output = as_flag(actions.get("output_dir"), "output_dir", "NEW_FOLDER")
        raise ResumeArgumentError(
            f"{request} would continue the run in {folder} with other arguments than it was started with: {said}. "
            "The checkpoint's optimiser, schedule and random states belong to the run's own arguments, so the "
            f"result would be neither run. Continue it with the run's values ({fix}), "
            f"or start a new run with yours ({output}).")
    return {name: {"from": before, "to": now} for name, (before, now) in sorted(changes.items())}
