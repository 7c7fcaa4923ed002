"""The DreamBooth search (train/dreambooth/search.py): which configurations each stage runs, that it selects on the
held-out loss alone, that it resumes from its records without training again, and one real run on a tiny pipeline."""

import json
import math
from types import SimpleNamespace

import pytest

from train.dreambooth import compare, search
from train.offline.pretrain_t2i import build_pipeline

#: The made-up held-out loss of the fake runs: lowest at these learning rates, and for PSOFT at rank 32 without the
#: scaling vectors, OFTv2 at block size 4 and LoRA at rank 4 (its default size: no refinement).
BEST_LR = {"psoft": 0.0316, "oft": 0.1, "lora": 0.00158}
BEST_SIZE = {"psoft": ("--rank", "32", "--no-train_alpha", "--no-train_beta"), "oft": ("--block_size", "4"),
             "lora": ("--lora_rank", "4")}


def fake_loss(config: search.Config, seed: int) -> float:
    return (0.1 + math.log10(config.lr / BEST_LR[config.method]) ** 2 + 0.01 * (config.size != BEST_SIZE[config.method])
            + 0.001 * seed)


@pytest.fixture
def fake_training(monkeypatch):
    """Trainings replaced by a metrics.json and the made-up loss of their flags; the commands, in order."""
    commands = []

    def run(command, check, env, stdout):
        method_at, lr_at = command.index("--method"), command.index("--learning_rate")
        config = search.Config(command[method_at + 1], tuple(command[method_at + 2:lr_at]), float(command[lr_at + 1]))
        folder = search.Path(command[command.index("--output_dir") + 1])
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"trainable": 1, "train_s": 1.0, "peak_mib": 2.0}))
        (folder / "loss").write_text(str(fake_loss(config, int(command[command.index("--seed") + 1]))))
        commands.append(command)

    monkeypatch.setattr(search, "subprocess", SimpleNamespace(run=run, DEVNULL=None))  # this module's calls only
    monkeypatch.setattr(search, "heldout_loss", lambda folder, heldout, prompt: float((folder / "loss").read_text()))
    return commands


def test_each_stage_runs_its_grid_and_the_best_is_the_lowest_heldout_loss(tmp_path, fake_training):
    doc = tmp_path / "docs" / "search.md"
    best = search.main(["--out", str(tmp_path / "runs"), "--doc", str(doc), "--jobs", "2"])
    assert {m: (c.size, c.lr) for m, (c, _) in best.items()} == {m: (BEST_SIZE[m], BEST_LR[m]) for m in BEST_LR}
    runs = json.loads(doc.with_suffix(".json").read_text())["runs"]
    lrs = {m: sorted({r["lr"] for r in runs.values() if r["method"] == m}) for m in BEST_LR}
    assert all(len(lrs[m]) >= 4 and lrs[m][-1] / lrs[m][0] >= 30 for m in lrs)  # the grid: >= 4 lrs, >= 30x
    sizes = {m: {r["size"] for r in runs.values() if r["method"] == m} for m in BEST_LR}
    assert sizes == {"psoft": {"r=8", "r=16", "r=32", "r=8 no scalings", "r=16 no scalings", "r=32 no scalings"},
                     "oft": {"b=4", "b=8", "b=16"}, "lora": {"r=4", "r=16"}}
    assert {r["seed"] for r in runs.values()} == {0, 1}
    # stage 1: 5 lrs x 3 methods; stage 2: 6 + 3 + 2 sizes at the stage-1 lr, less the 3 already run; refine: the 2
    # lrs beside each best, new for PSOFT and OFTv2 (their best size is not the one of stage 1; OFTv2's lr is beyond
    # the grid), run already for LoRA
    assert len(fake_training) == 2 * (15 + 8 + 4)
    assert max(lrs["oft"]) > 0.1
    text = doc.read_text()
    assert "## Best per method" in text and doc.with_suffix(".png").is_file()


def test_a_resumed_search_trains_nothing_it_has_a_record_of(tmp_path, fake_training):
    doc = tmp_path / "search.md"
    first = search.main(["--out", str(tmp_path / "a"), "--doc", str(doc), "--methods", "lora"])
    trained = len(fake_training)
    assert trained > 0
    # another machine: a fresh --out, only the doc's JSON record carried over
    again = search.main(["--out", str(tmp_path / "b"), "--doc", str(doc), "--methods", "lora"])
    assert len(fake_training) == trained and again == first


def record(method: str, size: str, lr: float, loss: float, trainable: int) -> dict:
    return dict(method=method, size=size, lr=lr, seed=0, heldout_loss=loss, trainable=trainable, train_s=1.0,
                peak_mib=1.0)


def test_the_comparison_takes_each_methods_best_and_psoft_at_loras_budget_from_the_record(tmp_path):
    runs = [record("psoft", "r=16", 0.01, 0.15, 12_768), record("psoft", "r=16", 0.1, 0.12, 12_768),
            record("psoft", "r=32", 0.01, 0.16, 47_040), record("psoft", "r=32 no scalings", 0.01, 0.17, 41_664),
            record("psoft", "r=32", 0.0316, 0.155, 47_040), record("oft", "b=4", 0.0316, 0.14, 9_000),
            record("lora", "r=4", 0.0158, 0.13, 48_640), record("lora", "r=16", 0.0158, 0.135, 194_560)]
    path = tmp_path / "search.json"
    path.write_text(json.dumps({"subject": "coffee", "seeds": [0], "runs": {str(i): r for i, r in enumerate(runs)}}))
    rows = {row.key: row for row in compare.searched_rows(path)}
    assert rows["psoft"].flags == ("--rank", "16", "--learning_rate", "0.1")
    assert rows["oft"].flags == ("--block_size", "4", "--learning_rate", "0.0316")
    assert rows["lora"].flags == ("--lora_rank", "4", "--learning_rate", "0.0158")
    # r=32 is nearest LoRA r=4's 48,640 parameters; its best learning rate there
    assert rows["psoft-budget"].flags == ("--rank", "32", "--learning_rate", "0.0316")
    assert rows["psoft"].label == "ours PSOFT r=16" and "LoRA's parameter count" in rows["psoft-budget"].label
    assert "psoft-half" not in rows  # the best, r=16, has under half LoRA's count already
    # LoRA's best at r=16 has more parameters than PSOFT's: LoRA joins at the size nearest PSOFT's count (r=4), PSOFT
    # at LoRA's count is its best already
    runs += [record("psoft", "r=32", 0.1, 0.11, 47_040), record("lora", "r=16", 0.05, 0.10, 194_560)]
    path.write_text(json.dumps({"subject": "coffee", "seeds": [0], "runs": {str(i): r for i, r in enumerate(runs)}}))
    rows = {row.key: row for row in compare.searched_rows(path)}
    assert rows["psoft"].flags == ("--rank", "32", "--learning_rate", "0.1")
    assert rows["lora"].flags == ("--lora_rank", "16", "--learning_rate", "0.05")
    assert rows["lora-budget"].flags == ("--lora_rank", "4", "--learning_rate", "0.0158")
    assert rows["lora-budget"].label == "PEFT LoRA r=4 (PSOFT's parameter count)"
    assert set(rows) == {"psoft", "oft", "lora", "lora-budget"}  # PSOFT r=32 is under half LoRA r=16's count


def test_an_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        search.main(["--out", str(tmp_path), "--methods", "dora"])


@pytest.mark.trainer
@pytest.mark.usefixtures("one_thread")
def test_one_real_run_records_a_finite_heldout_loss(tmp_path):
    pipe = tmp_path / "pipe"
    build_pipeline(seed=0).save_pretrained(pipe)
    args = search.build_parser().parse_args([
        "--out", str(tmp_path / "runs"), "--seeds", "0", "--", "--pretrained_model_name_or_path", str(pipe),
        "--max_train_steps", "2", "--num_class_images", "2"])
    record = search.Search(args).run(search.Config("psoft", ("--rank", "4"), 1e-2), seed=0)
    assert math.isfinite(record["heldout_loss"]) and record["trainable"] > 0
    saved = json.loads((tmp_path / "runs" / "search.json").read_text())["runs"]
    assert saved == {"psoft-rank4-lr0.01/seed0": record}
    assert len(list((tmp_path / "runs").rglob("class/*.png"))) == 2  # the class images it generated, kept


def test_ablations_vary_one_row_by_layer_type_and_cayley_neumann():
    row = compare.Row("psoft", "psoft", "ours PSOFT r=32", ("--rank", "32", "--learning_rate", "0.01"))
    rows = compare.ablation_rows(row)
    assert rows[0] == row and [r.key for r in rows[1:]] == ["psoft-attn", "psoft-ff", "psoft-proj", "psoft-neumann"]
    assert all(r.flags[:4] == row.flags and r.method == "psoft" for r in rows)
    assert rows[1].flags[4:] == ("--lora_layers", "attn") and rows[4].flags[4:] == ("--neumann_terms", "4")
    lora = compare.ablation_rows(compare.Row("lora", "lora", "PEFT LoRA r=4"))
    assert [r.key for r in lora] == ["lora", "lora-attn", "lora-ff", "lora-proj"]  # no Cayley to approximate
