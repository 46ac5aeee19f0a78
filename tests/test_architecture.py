"""The package's shape: imports point one way, `import tn_hf` is cheap, the ecosystem hooks are
isolated and installed whichever library is imported first."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tn_hf"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tn_hf module imported anywhere in the file (module level and inside functions)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tn_hf")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("tn_hf"):
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for d in _imports(path):
            while d not in modules and "." in d:
                d = d.rpartition(".")[0]
            if d != name:
                deps.add(d)
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if m == "tn_hf":  # the root only re-exports lazily; submodules must not import it
                return [n, m]
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not state.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if not state.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_and_no_imports_of_the_package_root():
    graph = _graph()
    assert len(graph) > 15
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_layers_point_down():
    graph = _graph()
    low = [n for n in graph if n.startswith(("tn_hf.decompositions", "tn_hf.layers"))]
    for n in low:
        up = {d for d in graph[n]
              if not d.startswith(("tn_hf.decompositions", "tn_hf.layers", "tn_hf._version", "tn_hf.config"))}
        assert not up, f"{n} imports {up}"
    core = ["tn_hf.targeting", "tn_hf.convert", "tn_hf.report", "tn_hf.serialization", "tn_hf.admm"]
    for n in core:
        assert not {d for d in graph[n] if d.startswith(("tn_hf.integrations", "tn_hf.hub", "tn_hf.cli"))}, n


def test_import_is_cheap():
    code = ("import sys, tn_hf; heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("order", ["tn_hf first", "libraries first"])
def test_hooks_install_whichever_is_imported_first(order):
    imports = ["import tn_hf", "import timm, transformers"]
    if order == "libraries first":
        imports.reverse()
    code = "; ".join(imports) + "; " + (
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q; "
        "import timm.models as pub; from timm.models import _builder as b; "
        "print('tn_hf' in Q, getattr(b.load_pretrained, '_tn_hf', False), pub.load_pretrained is b.load_pretrained)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr


def test_timm_hook_version_guard_and_uninstall(monkeypatch):
    import timm
    import timm.models as public
    from timm.models import _builder

    from tn_hf.integrations import timm as hook
    assert _builder.load_pretrained._tn_hf and public.load_pretrained is _builder.load_pretrained
    hook.uninstall()
    try:
        assert not getattr(_builder.load_pretrained, "_tn_hf", False)
        assert public.load_pretrained is _builder.load_pretrained
        monkeypatch.setattr(timm, "__version__", "9.0.0")
        with pytest.warns(UserWarning, match="timm 9.0.0 is not supported"):
            assert hook.install() is False
        assert not getattr(_builder.load_pretrained, "_tn_hf", False)
        monkeypatch.undo()
    finally:
        assert hook.install() is True
    assert _builder.load_pretrained._tn_hf and public.load_pretrained is _builder.load_pretrained
