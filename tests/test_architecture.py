"""The package's layers (docs/architecture.md): what may import what, and a core that needs no fairseq."""
import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny

PACKAGE = tiny.REPO / "fairseq_ext"
# Each layer may import its own and lower ones; tools and experiments are both on top, apart.
LAYERS = {"core": 0, "plugin": 1, "training": 2, "tools": 3, "experiments": 3}
SIDE_BY_SIDE = ("tools", "experiments")
FRAMEWORKS = ("fairseq", "fairseq_cli")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(tiny.REPO).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"


def imported_modules(path: Path, name: str, is_package: bool):
    """Every module an import statement in the file names, at any depth (functions too)."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from . import x` names a module


def layer_of(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fairseq_ext" and parts[1] in LAYERS else None


def test_each_layer_imports_only_layers_below_it():
    problems = []
    for path, name, is_package in modules():
        own = layer_of(name)
        if own is None:
            continue  # the package's own __init__: it registers the plugin
        for target in sorted(set(imported_modules(path, name, is_package))):
            other = layer_of(target)
            if other is None or (other == own and own not in SIDE_BY_SIDE):
                continue
            if other == own:  # a tool or an experiment uses no other one
                if target.split(".")[:3] != name.split(".")[:3] and target != f"fairseq_ext.{own}":
                    problems.append(f"{name} imports {target}: {own} stand side by side")
            elif LAYERS[other] >= LAYERS[own]:
                problems.append(f"{name} ({own}) imports {target} ({other})")
    assert problems == []


def test_the_core_imports_no_framework_and_nothing_loads_a_module_by_path():
    for path, name, is_package in modules():
        source = path.read_text(encoding="utf-8")
        assert "spec_from_file_location" not in source and "SourceFileLoader" not in source, name
        if layer_of(name) == "core":
            roots = {target.split(".")[0] for target in imported_modules(path, name, is_package)}
            assert not roots & set(FRAMEWORKS), f"{name} imports {roots & set(FRAMEWORKS)}"


def test_the_core_works_with_fairseq_unimportable(tmp_path):
    """``from fairseq_ext import bitfit`` and the delta format on a plain torch.nn model, fairseq blocked."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["fairseq"] = sys.modules["fairseq_cli"] = None  # any import of them fails
        import torch
        from torch import nn
        from fairseq_ext import bitfit
        from fairseq_ext.core import delta_file

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.self_attn = nn.Module()
                self.self_attn.q_proj = nn.Linear(4, 4)
                self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
                self.final_layer_norm = nn.LayerNorm(4)

            def forward(self, x):
                x = x + self.self_attn.q_proj(x)
                return self.final_layer_norm(x + self.fc2(torch.relu(self.fc1(x))))

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([Layer(), Layer()])
                self.classification_heads = nn.ModuleDict({{"task": nn.Linear(4, 2)}})

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return self.classification_heads["task"](x)

        torch.manual_seed(0)
        model, x = Model(), torch.randn(3, 4)
        frozen_before = {{n: p.detach().clone() for n, p in model.named_parameters()}}
        selection = bitfit.apply(model, terms="q,m2", forward_backward=lambda: model(x).sum().backward())
        assert sorted(selection.groups.values()) == ["head", "head", "m2", "m2", "q", "q"], selection.groups
        print(bitfit.report(model, selection))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).sum().backward()
        optimizer.step()
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, frozen_before[name]) != parameter.requires_grad, name

        trained = bitfit.trainable_state_dict(model)
        other = Model()
        bitfit.load_trainable_state_dict(other, trained)
        assert all(torch.equal(dict(other.named_parameters())[n], t) for n, t in trained.items())

        delta = delta_file.Delta(tensors=trained, selection={{"terms": "q,m2", "train_heads": True,
                                 "trained": sorted(trained)}}, task={{"cfg": {{}}}},
                                 model={{"arch": "toy", "args": {{}}, "namespace": False}},
                                 dictionary={{"sha256": "-", "size": 0}},
                                 base={{"fingerprint": delta_file.tensors_fingerprint(
                                     delta_file.frozen_base_tensors(model.state_dict(), trained)),
                                     "dtype": "float32", "tensors": 0, "parameters": 0}},
                                 progress={{}}, training_cfg={{}})
        delta.save({str(tmp_path / "toy.delta.safetensors")!r})
        again = delta_file.read_delta({str(tmp_path / "toy.delta.safetensors")!r})
        assert all(torch.equal(again.tensors[n], t) for n, t in trained.items())
        assert not [m for m in sys.modules if m.split(".")[0] in ("fairseq", "fairseq_cli") and sys.modules[m]]
        print("core ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tiny.REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tiny.REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "trainable params:" in result.stdout and result.stdout.strip().endswith("core ok")


def test_drivers_launch_train_py_by_its_module_name():
    import fairseq_ext.training.main
    from fairseq_ext.training import options

    assert options.TRAIN_MODULE == fairseq_ext.training.main.__name__
    assert options.TRAIN_COMMAND[1:] == ["-m", options.TRAIN_MODULE]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_is_a_documented_package(layer):
    assert (PACKAGE / layer / "__init__.py").read_text(encoding="utf-8").startswith('"""')
    assert f"fairseq_ext/{layer}/" in (tiny.REPO / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_torch_threads_sleep_when_idle_unless_the_user_says_otherwise():
    """fairseq_ext sets OMP_WAIT_POLICY before torch loads libgomp (which reads it only then): the
    spin count libgomp reports is its PASSIVE one, 0; a policy the user set is kept."""
    def spin_counts(**env):
        clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        result = subprocess.run([sys.executable, "-c", "import fairseq_ext, torch; torch.ones(4).sum()"],
                                cwd=tiny.REPO, capture_output=True, text=True,
                                env=dict(clean, OMP_DISPLAY_ENV="VERBOSE", **env))
        assert result.returncode == 0, result.stderr
        return set(re.findall(r"GOMP_SPINCOUNT = '(\d+)'", result.stderr))

    by_default = spin_counts()
    if not by_default:
        pytest.skip("torch here does not run on GNU OpenMP (libgomp)")
    assert by_default == {"0"}
    assert "0" not in spin_counts(OMP_WAIT_POLICY="ACTIVE")


def test_docs_architecture_lists_every_module():
    """docs/architecture.md's module table names every module of the package that defines something
    (``__main__`` entry points and ``__init__`` files that only import are left out), and no other."""
    listed = set(re.findall(r"^\| `([a-z0-9_/]+\.py)` \|", (tiny.REPO / "docs" / "architecture.md").read_text(), re.M))
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defines = any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in tree.body)
        if path.name == "__main__.py" or (path.name == "__init__.py" and not defines):
            continue
        if path.relative_to(PACKAGE).as_posix() not in listed:
            missing.append(path.relative_to(PACKAGE).as_posix())
    assert not missing, f"docs/architecture.md lacks a line for: {', '.join(missing)}"
    gone = sorted(name for name in listed if not (PACKAGE / name).exists())
    assert not gone, f"docs/architecture.md lists modules that do not exist: {', '.join(gone)}"
