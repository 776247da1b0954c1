"""The library's structure, checked: the declared layers and no import cycles (import-linter's
contracts in pyproject.toml), and imports inside functions only where a module must stay optional."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "landmark"

# Imports inside functions: (module, imported) -> why it cannot be at the top of the module. Third-party
# optional dependencies are imported through landmark.optional.require, without an import statement.
LAZY_IMPORTS = {
    ("landmark.ops.attention", "landmark.ops.triton"): "imports triton (the gpu extra)",
    ("landmark.inference.graph", "landmark.inference.triton_retrieval"): "imports triton (the gpu extra)",
    ("landmark.hf", "landmark.hf.retrieval"): "imports transformers at the top (the hf extra)",
    ("landmark.hf.generate", "landmark.hf.retrieval"): "imports transformers at the top (the hf extra)",
    ("landmark.eval.ruler", "landmark.eval.harness"): "imports lm_eval at the top (the lmeval extra)",
    ("landmark.inference.kernel", "torch.utils.cpp_extension"): "only to build the kernel: pulls setuptools",
    ("landmark", "landmark.ops"): "import landmark stays light: torch loads on first use of an operation",
    ("landmark.__main__", "landmark.cli"): "Ctrl-C while the command imports torch ends in one line",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """What an import statement in ``module`` imports, as absolute module names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        is_package = (PACKAGE.parent / Path(*package) / "__init__.py").is_file()
        package = package if is_package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        is_module = (REPO / Path(*full.split("."))).with_suffix(".py").is_file()
        is_package = (REPO / Path(*full.split(".")) / "__init__.py").is_file()
        out.append(full if full.startswith("landmark") and (is_module or is_package) else base)
    return out


def function_level_imports() -> list[tuple[str, str, int]]:
    """(module, imported module, line) of every import statement inside a function of the library."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        found += [(module, name, node.lineno) for name in _imported(module, node)]
    return found


def test_import_contracts_hold():
    """`lint-imports` (the layers ops -> model -> data -> inference/train -> hf -> eval -> cli, and no
    cycle between the modules of any package), as CI runs it."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.is_file() else [shutil.which("lint-imports") or "lint-imports"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_imports_inside_functions_are_only_the_optional_ones():
    found = function_level_imports()
    unexplained = [f"{m}:{line} imports {name}" for m, name, line in found if (m, name) not in LAZY_IMPORTS]
    assert not unexplained, "move these imports to the top of their module:\n" + "\n".join(unexplained)
    assert len(found) <= 20


def test_the_import_scanner_sees_function_level_imports(tmp_path):
    """The scanner above must be able to fail: it finds an import written inside a function."""
    tree = ast.parse("def f():\n    import json\n    from landmark.ops import attention\n")
    fn = tree.body[0]
    names = [n for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))
             for n in _imported("landmark.cli", node)]  # fmt: skip
    assert names == ["json", "landmark.ops.attention"]


def test_the_core_commands_start_without_the_optional_dependencies():
    """`import landmark.cli` (every command's entry point) imports none of the optional packages."""
    code = (
        "import sys, landmark.cli; "
        "print(','.join(m for m in ('transformers', 'peft', 'triton', 'faiss', 'lm_eval', 'datasets', "
        "'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def _function_sizes():
    """(where, name, parameters without self/cls, lines) of every function in the package, Triton
    kernels (``@triton.jit``) left out."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            found.append((where, node.name, len(names), node.end_lineno - node.lineno + 1))
    return found


def test_functions_are_short_and_take_few_parameters():
    """Outside Triton kernels: no function over 8 parameters (6 in the inference engine) or 80 lines
    (``**options`` forwarded to an options object is not counted)."""
    sizes = _function_sizes()
    assert len(sizes) > 500  # the scan sees the package
    many = [f"{w} {n}: {p} parameters" for w, n, p, _ in sizes if p > 8]
    engine = "landmark/inference/"
    many += [f"{w} {n}: {p} parameters" for w, n, p, _ in sizes if p > 6 and w.startswith(engine)]
    long = [f"{w} {n}: {lines} lines" for w, n, _, lines in sizes if lines > 80]
    assert not many and not long, "\n".join(many + long)
