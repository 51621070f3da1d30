"""The command line: errors in recipes and data are reported before Ray starts."""
import json
import subprocess
import sys


def prefopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prefopt.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_malformed_data_row_is_a_clear_error_before_ray(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "Describe the river.", "chosen": "kind clear.", "rejected": "rude vague."}] * 5
    rows.insert(3, {"prompt": "Describe the city.", "chosen": 42, "rejected": "rude."})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = prefopt("train", "recipes/tiny_dpo.yaml", f"data.path={data}", f"output.root={tmp_path}/runs")
    assert out.returncode == 2
    assert "prefs.jsonl" in out.stderr and "row 3" in out.stderr and "'chosen'" in out.stderr
    assert "Traceback" not in out.stderr
    assert "ray" not in out.stderr.lower()          # nothing was started
    assert not (tmp_path / "runs").exists()         # and no run directory was created


def test_missing_data_file_is_a_clear_error(tmp_path):
    out = prefopt("train", "recipes/tiny_dpo.yaml", f"data.path={tmp_path}/nope.jsonl",
                  f"output.root={tmp_path}/runs")
    assert out.returncode == 2 and "nope.jsonl" in out.stderr and "Traceback" not in out.stderr


def test_mistyped_override_from_the_command_line(tmp_path):
    out = prefopt("train", "recipes/tiny_dpo.yaml", "objective.betta=0.2")
    assert out.returncode == 2
    assert "unknown key 'objective.betta' (did you mean 'objective.beta'?)" in out.stderr


def test_existing_results_are_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    out = prefopt("train", "recipes/tiny_dpo.yaml", f"output.run_dir={run_dir}")
    assert out.returncode == 2 and "already holds a run's results" in out.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
