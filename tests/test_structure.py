"""The package's import structure: no import cycle among psoft_vision's modules, counting the imports inside
functions too (a cycle that holds only because one import is deferred is still a cycle), and no module importing
another's private names."""

import ast
import importlib
from pathlib import Path

import pytest

import psoft_vision

PACKAGE = Path(psoft_vision.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The psoft_vision modules ``name`` imports anywhere in its file: ``from .x import y`` reaches ``x``, and ``x.y``
    too where that is a module. A package's ``__init__`` reached only as the parent of a module is not counted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_without_deprecated_aliases(ast.parse(path.read_text(), str(path)))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return {m for m in found if m in known and m != name}


def _without_deprecated_aliases(tree: ast.Module) -> ast.Module:
    """The module less a module-level ``__getattr__``: it runs only when a name the module does not define is read,
    after the module is imported, to hand out a moved name with a DeprecationWarning; what it imports then is where
    the name went, not something the module needs."""
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    return tree


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm), each as a sorted list."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_walker_sees_function_local_imports_and_finds_a_cycle():
    graph = import_graph()
    assert "psoft_vision.model" in graph["psoft_vision.quantized"]  # quantize_base's adapted_layers check
    assert "psoft_vision.registry" in graph["psoft_vision.card"]  # imported inside AdapterSummary.read
    assert "psoft_vision.targets" in graph["psoft_vision.config"]  # imported inside check_target_spec
    assert cycles({**graph, "psoft_vision.layer": graph["psoft_vision.layer"] | {"psoft_vision.lifecycle"}})


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def private_imports() -> list[tuple[str, str]]:
    """``(module, name)`` for every ``_name`` a psoft_vision module imports from another."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("psoft_vision")):
                found += [(name, a.name) for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_names_that_moved_still_import_from_where_they_were():
    with pytest.warns(DeprecationWarning, match="psoft_vision.hub.push_to_hub moved"):
        from psoft_vision.hub import push_to_hub
    from psoft_vision.lifecycle import REQUIRES_GRAD, adapted_layers, adapter_names, one_adapter_name, unwrapped
    from psoft_vision.model import REQUIRES_GRAD as requires_grad
    from psoft_vision.quantized import dequantized_weight, keep_training_layout, quantization_of, quantize_base
    from psoft_vision.quantized_layers import quantization_of as detect

    assert push_to_hub is psoft_vision.push_to_hub and quantize_base is psoft_vision.quantize_base
    assert adapted_layers is psoft_vision.adapted_layers and adapter_names is psoft_vision.adapter_names
    assert quantization_of is detect and callable(dequantized_weight) and callable(keep_training_layout)
    assert REQUIRES_GRAD == requires_grad and callable(one_adapter_name) and callable(unwrapped)


def test_modules_that_moved_into_formats_still_import_from_where_they_were():
    from psoft_vision.formats import fingerprint, kohya_lora, native, peft_adapter
    from psoft_vision.formats.lora_factors import lora_weights

    for old, name, new in [("io", "load_adapter", native.load_adapter), ("io", "read_adapter", native.read_adapter),
                           ("io", "save_adapter", psoft_vision.save_adapter),
                           ("diffusers", "load_adapter_into_pipeline", native.load_adapter_into_pipeline),
                           ("diffusers", "load_peft_lora", peft_adapter.load_peft_lora),
                           ("diffusers", "denoiser", psoft_vision.model.denoiser),
                           ("kohya", "module_factors", kohya_lora.module_factors),
                           ("fingerprint", "fingerprint", fingerprint.fingerprint),
                           ("export", "lora_weights", lora_weights), ("export", "holding", psoft_vision.model.holding),
                           ("export", "write_peft_directory", peft_adapter.write_peft_directory),
                           ("export_oft", "PEFT_VERSION", peft_adapter.PEFT_VERSION)]:
        module = importlib.import_module(f"psoft_vision.{old}")
        with pytest.warns(DeprecationWarning, match=f"psoft_vision.{old}.{name} moved"):
            assert getattr(module, name) is new
    with pytest.raises(AttributeError):
        psoft_vision.io.no_such_name  # noqa: B018  (an unknown name is still an AttributeError)
    assert issubclass(psoft_vision.OFTExportError, psoft_vision.LoRAExportError)
