"""Pure parts of prefopt import without the heavy backends (fast unit tests, light tooling)."""
import subprocess
import sys


def test_pure_modules_do_not_import_backends():
    code = ("import sys, prefopt, prefopt.config, prefopt.objectives, prefopt.data, prefopt.data.batching, "
            "prefopt.metrics, prefopt.cli; "
            "heavy = [m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lower_layers_never_import_the_loops():
    """roles, backends, models, data, rl, rewards and objectives sit below the drivers (loops)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "prefopt"
    offenders = []
    for layer in ("roles", "backends", "models", "data", "rl", "rewards", "objectives"):
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("prefopt.loops")]
    assert not offenders, offenders
