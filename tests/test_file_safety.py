"""Writing and reading adapter files safely: only regular files are replaced, folder exports swap in whole, a
failed write leaves what was there, and every field read from a file is bounded and checked (issue 21)."""

import errno
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import psoft_vision as pv
import psoft_vision.files
from psoft_vision.formats import peft_adapter


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def adapted(method="psoft") -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    targets = ["fc1", "fc2"]
    config = pv.PSOFTConfig(rank=4, targets=targets) if method == "psoft" else \
        pv.OFTConfig(block_size=4, neumann_terms=4, targets=targets)
    pv.inject(model, config)
    with torch.no_grad():
        for _, layer in pv.adapted_layers(model):
            for p in layer.adapters["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


# (how to make the path, what it is said to be)
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _char_device(path: Path) -> Path:  # a node like /dev/null's, in the test's own folder (we run as root)
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    return path


SPECIAL = {"FIFO": (_fifo, "a FIFO \\(named pipe\\)"), "character device": (_char_device, "a character device"),
           "socket": (_socket, "a socket"), "directory": (_directory, "a directory")}
WRITERS = {"save_adapter": pv.save_adapter, "export_lora": lambda model, path: pv.export_lora(model, path)}


def _kind(path: Path):
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("special", list(SPECIAL))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_only_regular_files_are_replaced(tmp_path, writer, special):
    make, said = SPECIAL[special]
    path = make(tmp_path / "target.safetensors")
    kind = _kind(path)
    with pytest.raises(pv.OutputPathError, match=f"target.safetensors' is {said}, not a regular file"):
        WRITERS[writer](adapted(), path)
    assert _kind(path) == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.safetensors"]  # no temporary left


@pytest.mark.parametrize("special", ["FIFO", "character device", "socket"])
@pytest.mark.parametrize("export", ["lora", "oft"])
def test_a_folder_export_replaces_only_a_folder(tmp_path, export, special):
    make, said = SPECIAL[special]
    path = make(tmp_path / "out")
    kind = _kind(path)
    with pytest.raises(pv.OutputPathError, match=f"out' is {said}, not a directory"):
        pv.export_oft(adapted("oft"), path) if export == "oft" else pv.export_lora(adapted(), path, format="peft")
    assert _kind(path) == kind and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symlink_to_a_device_is_not_replaced(tmp_path):
    device = _char_device(tmp_path / "null")
    link = tmp_path / "adapter.safetensors"
    link.symlink_to(device)
    with pytest.raises(pv.OutputPathError, match="is a character device"):
        pv.save_adapter(adapted(), link)
    assert link.is_symlink() and _kind(device) == stat.S_IFCHR


#: Every writer of adapter files and exports, by name: ``(model, path)``.
WRITERS = {"save_adapter": pv.save_adapter, "export_lora": pv.export_lora,
           "export_lora peft": lambda model, path: pv.export_lora(model, path, format="peft"),
           "export_oft": pv.export_oft}


@pytest.mark.parametrize("path", ["", "."])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_empty_and_dot_paths_are_named_errors(tmp_path, monkeypatch, path, writer):
    monkeypatch.chdir(tmp_path)
    model = adapted("oft" if writer == "export_oft" else "psoft")
    with pytest.raises(pv.OutputPathError, match="names no"):
        WRITERS[writer](model, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_folder_that_is_a_file_is_a_named_error(tmp_path, writer):
    blocking = tmp_path / "models"
    blocking.write_text("a file")
    model = adapted("oft" if writer == "export_oft" else "psoft")
    target = blocking / "run" / ("a.safetensors" if writer == "save_adapter" else "out")
    with pytest.raises(pv.OutputPathError, match="models' is a regular file, not a folder"):
        WRITERS[writer](model, target)
    assert blocking.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_folder_export_onto_a_file_is_a_named_error(tmp_path):
    target = tmp_path / "peft"
    target.write_text("a file")
    with pytest.raises(pv.OutputPathError, match="peft' is a regular file, not a directory"):
        pv.export_lora(adapted(), target, format="peft")
    assert target.read_text() == "a file"


def _failing(monkeypatch, code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(psoft_vision.files.os, "replace", fail)  # a file's last step
    monkeypatch.setattr(psoft_vision.files.os, "mkdir", fail)  # a folder export's first


@pytest.mark.parametrize("code, why", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                       (errno.EACCES, "permission denied")])
def test_a_refused_write_is_named_and_keeps_the_old_file(tmp_path, monkeypatch, code, why):
    """The file system's refusal, simulated by making os.replace and os.mkdir fail as a read-only (or full, or
    forbidden) file system makes them fail: running as root, a read-only folder would not refuse. (The test below
    uses a real read-only mount where the machine allows one.)"""
    model = adapted()
    path = pv.save_adapter(model, tmp_path / "a.safetensors")
    folder = pv.export_lora(model, tmp_path / "peft", format="peft")
    old_file, old_folder = path.read_bytes(), {p.name: p.read_bytes() for p in folder.iterdir()}
    pv.set_strength(model, 0.5)
    _failing(monkeypatch, code)
    with pytest.raises(pv.OutputPathError, match=why):
        pv.save_adapter(model, path)
    with pytest.raises(pv.OutputPathError, match=why):
        pv.export_lora(model, folder, format="peft")
    monkeypatch.undo()
    assert path.read_bytes() == old_file and {p.name: p.read_bytes() for p in folder.iterdir()} == old_folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "peft"]


def test_a_full_disk_is_named_and_keeps_the_old_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as ``SafetensorError('... No space left on device (os error 28)')``."""
    from safetensors import SafetensorError

    model = adapted()
    path = pv.save_adapter(model, tmp_path / "a.safetensors")
    old = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(psoft_vision.files, "save_file", full)
    with pytest.raises(pv.OutputPathError, match="disk is full"):
        pv.save_adapter(model, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB tmpfs, where the machine lets us mount one (root with CAP_SYS_ADMIN)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; the disk-full case is covered by the simulated test above")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_and_a_real_read_only_mount_keep_the_old_file(small_tmpfs):
    model = adapted()
    path = pv.save_adapter(model, small_tmpfs / "a.safetensors")
    old = path.read_bytes()
    big = Net()
    big.fc1, big.fc2 = nn.Linear(16, 1024), nn.Linear(1024, 16)
    pv.inject(big, pv.PSOFTConfig(rank=16, targets=["fc1", "fc2"]))
    with pytest.raises(pv.OutputPathError, match="disk is full"):
        pv.save_adapter(big, path, include_bases=True)
    assert path.read_bytes() == old and [p.name for p in small_tmpfs.iterdir()] == ["a.safetensors"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(pv.OutputPathError, match="read-only"):
        pv.save_adapter(model, path)
    assert path.read_bytes() == old


@pytest.mark.parametrize("export", ["lora", "oft"])
def test_a_folder_export_swaps_in_whole_and_keeps_other_files(tmp_path, monkeypatch, export):
    model = adapted("oft" if export == "oft" else "psoft")
    write = (lambda: pv.export_oft(model, tmp_path / "out")) if export == "oft" else \
        (lambda: pv.export_lora(model, tmp_path / "out", format="peft"))
    folder = write()
    (folder / "README.md").write_text("mine")
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    pv.set_strength(model, 0.5)

    def killed(tensors, filename, metadata=None):  # the process dies after the weights, before the config
        original(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt

    original = peft_adapter.save_file
    monkeypatch.setattr(peft_adapter, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        write()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write()
    new = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert new["README.md"] == b"mine" and new.keys() == old.keys()
    assert new["adapter_model.safetensors"] != old["adapter_model.safetensors"]


def test_a_killed_folder_export_is_cleaned_up_by_the_next(tmp_path):
    folder = pv.export_lora(adapted(), tmp_path / "out", format="peft")
    stale = tmp_path / ".out.999999999.psoft-tmp"  # a pid that cannot be running
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    pv.export_lora(adapted(), folder, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("special", ["FIFO", "character device", "socket", "symlink to a device", "broken symlink"])
def test_loading_a_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, special):
    path = tmp_path / "a.safetensors"
    if special == "symlink to a device":
        path.symlink_to("/dev/zero")
        said = "a character device"
    elif special == "broken symlink":
        path.symlink_to(tmp_path / "gone")
        said = "a broken symbolic link"
    else:
        make, said = SPECIAL[special]
        make(path)
    with pytest.raises(pv.AdapterFileError, match=f"is not a regular file \\(it is {said}\\)"):
        pv.load_adapter(Net(), path)


def rewrite(path: Path, edit=None, raw: str | None = None) -> Path:
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["psoft_vision"])
    if edit:
        edit(header)
    metadata["psoft_vision"] = raw if raw is not None else json.dumps(header)
    save_file(tensors, path, metadata=metadata)
    return path


def _first(mapping: dict) -> dict:
    return next(iter(mapping.values()))


# (edit of the header, or raw metadata text; the error; what the message names)
MALFORMED = {
    "fingerprints not an object": (lambda h: h.update(fingerprints=[1]), "fingerprints"),
    "fingerprint a list": (lambda h: h["fingerprints"].update({"fc1": [1, 2]}), "fingerprint of 'fc1' is list"),
    "fingerprint without norm": (lambda h: h["fingerprints"]["fc1"].pop("norm"), "number 'norm'"),
    "norm a string": (lambda h: h["fingerprints"]["fc1"].update(norm="1.0"), "number 'norm'"),
    "probes missing": (lambda h: h["fingerprints"]["fc1"].pop("probes"), "8 numbers 'probes'"),
    "probes too few": (lambda h: h["fingerprints"]["fc1"].update(probes=[0.1]), "8 numbers 'probes'"),
    "probes not numbers": (lambda h: h["fingerprints"]["fc1"].update(probes=["a"] * 8), "8 numbers 'probes'"),
    "old version without sketch": (lambda h: h["fingerprints"]["fc1"].update(version=1), "4 numbers 'sketch'"),
    "shape not a list": (lambda h: h["fingerprints"]["fc1"].update(shape="32x16"), "shape '32x16'"),
    "shape of strings": (lambda h: h["fingerprints"]["fc1"].update(shape=["32", 16]), "not a list of sizes"),
    "layer facts a list": (lambda h: h["layers"].update(fc1=[4]), "layer 'fc1' is described by list"),
    "layer facts a number": (lambda h: h["layers"].update(fc1=4), "layer 'fc1' is described by int"),
    "rank a string": (lambda h: h["layers"]["fc1"].update(rank="4"), "rank '4', not a positive integer"),
    "rank zero": (lambda h: h["layers"]["fc1"].update(rank=0), "rank 0, not a positive integer"),
    "rank a bool": (lambda h: h["layers"]["fc1"].update(rank=True), "rank True"),
    "config without train_modules": (lambda h: h["config"].pop("train_modules"), None),
    "train_modules a string": (lambda h: h["config"].update(train_modules="fc2"), "fc2"),
    "strength a string": (lambda h: h.update(strength="1"), "strength"),
    "strength a bool": (lambda h: h.update(strength=True), "strength"),
    "strength 1e308": (lambda h: h.update(strength=1e308), "strength 1e\\+308"),
    "strength infinite": (lambda h: h.update(strength=float("inf")), "strength inf"),
    "strength NaN": (lambda h: h.update(strength=float("nan")), "strength nan"),
    "anchors a string": (lambda h: h.update(anchors="yes"), "anchors"),
    "neumann_terms 10**9": (lambda h: h["config"].update(neumann_terms=10**9), "neumann_terms=1000000000 exceeds 64"),
    "duplicate key": ('{"method": "psoft", "method": "oft"}', "the key 'method' appears twice"),
    "nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "nested object 100,000 deep": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metadata_is_a_named_error_that_changes_nothing(tmp_path, case):
    edit, match = MALFORMED[case]
    model = adapted()
    path = pv.save_adapter(model, tmp_path / "a.safetensors")
    rewrite(path, raw=edit) if isinstance(edit, str) else rewrite(path, edit=edit)
    torch.manual_seed(0)
    target = Net().eval()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    if match is None:  # an omitted field with a default: loads, as the config's default
        pv.load_adapter(target, path)
        torch.testing.assert_close(target(torch.ones(2, 16)), model(torch.ones(2, 16)), rtol=1e-5, atol=1e-6)
        return
    with pytest.raises(pv.AdapterFileError, match=match):
        pv.load_adapter(target, path)
    assert not list(pv.adapted_layers(target))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("field, size", [("rank", 10**9), ("block_size", 64)])
def test_a_size_beyond_the_layer_is_refused(tmp_path, field, size):
    model = adapted("psoft" if field == "rank" else "oft")
    path = rewrite(pv.save_adapter(model, tmp_path / "a.safetensors"),
                   edit=lambda h: h["layers"]["fc1"].update({field: size}))
    with pytest.raises(pv.KeyMismatchError, match=f"{field} {size} on 'fc1', whose input width is 16"):
        pv.load_adapter(Net(), path)


def test_neumann_terms_are_bounded_in_configs_too():
    with pytest.raises(pv.ConfigError, match="exceeds 64"):
        pv.OFTConfig(neumann_terms=65)
    pv.OFTConfig(neumann_terms=64)
