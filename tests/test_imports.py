"""Pure parts of prefopt import without the heavy backends (fast unit tests, light tooling)."""
import subprocess
import sys


def test_pure_modules_do_not_import_backends():
    code = ("import sys, prefopt, prefopt.config, prefopt.objectives, prefopt.data, prefopt.loops.batching, "
            "prefopt.loops.metrics, prefopt.cli; "
            "heavy = [m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
