"""Run directories never take over the user's files; killed runs (torn metrics, broken checkpoint
state) stay readable and resumable. Pure: no Ray."""
import json
import logging
import os
from pathlib import Path

import pytest

from prefopt.config import load_recipe
from prefopt.errors import ConfigError, DataError
from prefopt.io import checkpoint
from prefopt.io.checkpoint import (cut_to_checkpoint, find_resume_point, list_checkpoints, read_state,
                                   truncate_metrics)
from prefopt.io.run_dir import MARKER, MetricsLogger, check_run_dir, create_run_dir, read_metrics, read_run


def recipe(*overrides):
    return load_recipe("recipes/tiny_dpo.yaml", list(overrides))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes) and every folder (-> None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# --- run directory: whose folder is it ---------------------------------------------------------

def test_fresh_run_dir_is_created_with_a_marker(tmp_path):
    r = recipe(f"output.run_dir={tmp_path}/a/b/run")
    assert check_run_dir(r) == (tmp_path / "a/b/run").resolve()
    assert not (tmp_path / "a").exists()                      # the check writes nothing
    path = create_run_dir(r)
    assert path == (tmp_path / "a/b/run").resolve() and path.is_dir()
    marker = json.loads((path / MARKER).read_text())
    assert marker["name"] == "tiny-dpo" and marker["created"] and marker["prefopt"]
    assert [p.name for p in path.iterdir()] == [MARKER]


def test_default_run_dir_is_timestamped_under_root(tmp_path):
    r = recipe(f"output.root={tmp_path}/runs")
    planned = check_run_dir(r)
    assert planned.parent == (tmp_path / "runs").resolve() and planned.name.startswith("tiny-dpo-")
    assert not (tmp_path / "runs").exists()
    first, second = create_run_dir(r), create_run_dir(r)
    assert first != second and first.parent == second.parent == (tmp_path / "runs").resolve()
    assert second.name == f"{first.name}-2" or second.name > first.name      # same second: "-2"
    assert (first / MARKER).is_file() and (second / MARKER).is_file()


def test_existing_empty_folder_is_used_and_marked(tmp_path):
    (tmp_path / "run").mkdir()
    path = create_run_dir(recipe(f"output.run_dir={tmp_path}/run"))
    assert path == (tmp_path / "run").resolve() and (path / MARKER).is_file()


def test_users_non_empty_folder_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "thesis"
    (folder / "figures").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "notes.txt").write_bytes(b"\x00\xffprecious")
    before = snapshot(folder)
    r = recipe(f"output.run_dir={folder}")
    for fn in (check_run_dir, create_run_dir):
        with pytest.raises(ConfigError) as e:
            fn(r)
        msg = str(e.value)
        assert f"output.run_dir '{folder}' is a non-empty folder that prefopt did not create" in msg
        assert "config.yaml, figures, notes.txt" in msg and "new or empty folder" in msg
        assert snapshot(folder) == before                     # byte for byte, no marker added


def test_listing_of_a_large_foreign_folder_is_short(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"holds f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 3 more\)"):
        check_run_dir(recipe(f"output.run_dir={tmp_path}"))


def test_a_hidden_file_alone_makes_a_folder_foreign(tmp_path):
    (tmp_path / ".keep").write_text("")
    with pytest.raises(ConfigError, match=r"holds \.keep\)"):
        create_run_dir(recipe(f"output.run_dir={tmp_path}"))
    assert snapshot(tmp_path) == {".keep": b""}


def test_folder_with_results_is_refused_marker_or_not(tmp_path):
    for marked in (False, True):
        for result in ("metrics.jsonl", "model", "summary.json"):
            folder = tmp_path / f"{result}-{marked}"
            folder.mkdir()
            if marked:
                (folder / MARKER).write_text("{}")
            if result == "model":
                (folder / "model").mkdir()
            else:
                (folder / result).write_text('{"step": 1}\n')
            before = snapshot(folder)
            with pytest.raises(ConfigError) as e:
                create_run_dir(recipe(f"output.run_dir={folder}"))
            assert f"output.run_dir '{folder}' already holds a run's results ({result})" in str(e.value)
            assert "prefopt never overwrites results" in str(e.value)
            assert snapshot(folder) == before


def test_a_marked_folder_without_results_is_reused(tmp_path):
    """A run that failed before any result (e.g. Ray did not start) may be re-run into its folder."""
    first = create_run_dir(recipe(f"output.run_dir={tmp_path}/run"))
    marker = (first / MARKER).read_bytes()
    (first / "config.yaml").write_text("name: tiny-dpo\n")
    (first / "placement.json").write_text("{}")
    (first / "metrics.jsonl").write_text("")                           # opened, nothing logged yet
    assert create_run_dir(recipe(f"output.run_dir={tmp_path}/run")) == first
    assert (first / MARKER).read_bytes() == marker                   # the original creation record
    (first / "metrics.jsonl").write_text("\n")                         # not empty: results
    with pytest.raises(ConfigError, match=r"already holds a run's results \(metrics.jsonl\)"):
        check_run_dir(recipe(f"output.run_dir={tmp_path}/run"))


def test_an_empty_metrics_file_in_an_unmarked_folder_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"already holds a run's results \(metrics.jsonl\)"):
        check_run_dir(recipe(f"output.run_dir={tmp_path}"))


@pytest.mark.parametrize("key", ["output.run_dir", "output.root"])
def test_a_file_where_a_folder_belongs(tmp_path, key):
    blocker = tmp_path / "results.csv"
    blocker.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError) as e:
        create_run_dir(recipe(f"{key}={blocker}"))
    assert str(e.value) == f"{key} '{blocker}' is a file, not a folder; choose a folder for the run's outputs"
    under = blocker / "sub" / "run"
    with pytest.raises(ConfigError) as e:
        check_run_dir(recipe(f"{key}={under}"))
    assert str(e.value) == (f"{key} '{under}': '{blocker}' is a file, not a folder, so '{under}' cannot be "
                            f"created under it")
    assert snapshot(tmp_path) == {"results.csv": b"a,b\n1,2\n"}


def test_output_root_without_permission(tmp_path, monkeypatch):
    root = tmp_path / "locked"
    root.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    with pytest.raises(ConfigError) as e:
        create_run_dir(recipe(f"output.root={root}/runs"))
    assert str(e.value) == f"output.root '{root}/runs': no permission to create folders in '{root}'"
    with pytest.raises(ConfigError, match=f"output.run_dir '{root}': no permission to write into '{root}'"):
        check_run_dir(recipe(f"output.run_dir={root}"))
    assert list(root.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_root_without_permission_for_real(tmp_path):
    root = tmp_path / "locked"
    root.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="no permission to create folders in"):
        create_run_dir(recipe(f"output.root={root}/runs"))


def test_mkdir_failure_is_a_config_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ConfigError, match=r"output.root: cannot create the run directory '.*tiny-dpo-.*': "
                                          r"Permission denied"):
        create_run_dir(recipe(f"output.root={tmp_path}/runs"))


# --- metrics.jsonl of a killed run ---------------------------------------------------------------

def write_metrics(run_dir: Path, steps, torn: bytes = b"") -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLogger(run_dir, loggers=[])
    for step in steps:
        log.log(step, {"loss": 1.0 / step})
    log.close()
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(torn)
    return (run_dir / "metrics.jsonl").read_bytes()


TORN = b'{"step": 5, "split": "train", "lo'


def test_read_metrics_skips_a_torn_last_line(tmp_path, caplog):
    write_metrics(tmp_path / "run", [1, 2, 3], TORN)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "metrics.jsonl: skipping its torn last line 4" in caplog.text
    assert read_run(tmp_path / "run").history("loss") == [1.0, 0.5, 1 / 3]


def test_read_metrics_broken_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl\n{"step": 3, "split": "train"}\n')
    with pytest.raises(DataError) as e:
        read_metrics(tmp_path)
    assert str(e.value).startswith(f"file {path}: line 2 is not a metrics record (")
    assert "fix or delete that line" in str(e.value)


def test_resume_drops_a_torn_last_record_and_keeps_its_text(tmp_path, caplog):
    run = tmp_path / "run"
    write_metrics(run, [1, 2, 3, 4], TORN)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        message = truncate_metrics(run, 2)
    assert message.startswith(f"{run / 'metrics.jsonl'}: dropped its torn last line 5 (the run was killed")
    assert str(run / "metrics.torn.txt") in message and message in caplog.text
    assert (run / "metrics.torn.txt").read_bytes() == TORN + b"\n"
    assert [json.loads(line)["step"] for line in (run / "metrics.after-checkpoint.jsonl").read_text().splitlines()] \
        == [3, 4]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert (run / "metrics.jsonl").read_bytes().endswith(b"}\n") and not (run / "metrics.jsonl.part").exists()


def test_resume_torn_text_that_is_not_utf8_is_kept_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    torn = b'{"step": 3, "split": "train", "x": "\xe2\x82'     # cut inside a multi-byte character
    write_metrics(run, [1, 2], torn)
    assert truncate_metrics(run, 2) is not None
    assert (run / "metrics.torn.txt").read_bytes() == torn + b"\n"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resume_without_a_torn_line_returns_none(tmp_path):
    run = tmp_path / "run"
    full = write_metrics(run, [1, 2, 3])
    assert truncate_metrics(run, 3) is None
    assert (run / "metrics.jsonl").read_bytes() == full
    assert not (run / "metrics.torn.txt").exists() and not (run / "metrics.after-checkpoint.jsonl").exists()


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, [1], b'{"step": 2, "split": "train", "loss": 0.5}')
    assert truncate_metrics(run, 5) is None
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert (run / "metrics.jsonl").read_bytes().endswith(b'"loss": 0.5}\n')


def test_resume_refuses_a_broken_line_before_the_last_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = b'{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n'
    (run / "metrics.jsonl").write_bytes(text)
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        truncate_metrics(run, 1)
    assert snapshot(run) == {"metrics.jsonl": text}


# --- checkpoints with a broken state.json --------------------------------------------------------

def make_checkpoint(run_dir: Path, counter: int, state: bytes | None = None) -> Path:
    tmp = checkpoint.begin(run_dir, f"step_{counter:06d}")
    final = checkpoint.commit(tmp, {"counter": counter}, keep_last=0)
    if state is not None:
        (final / "state.json").write_bytes(state)
    return final


BROKEN_STATES = {"empty": (b"", "is empty"), "truncated": (b'{"counter": 1', "is not valid JSON"),
                 "no counter": (b'{"data": {}}', "has no integer 'counter'"),
                 "not an object": (b"[1, 2]", "is not a JSON object"),
                 "binary": (b"\xff\xfe\x00", "is not UTF-8 text")}


@pytest.mark.parametrize("kind", list(BROKEN_STATES))
def test_list_checkpoints_skips_a_broken_state(tmp_path, caplog, kind):
    content, problem = BROKEN_STATES[kind]
    run = tmp_path / "run"
    good = [make_checkpoint(run, 2), make_checkpoint(run, 4)]
    bad = make_checkpoint(run, 6, content)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        assert list_checkpoints(run) == good
    assert f"checkpoint {bad} is not intact and is skipped: {bad / 'state.json'} {problem}" in caplog.text
    # resume=<run dir> and resume=auto fall back to the newest intact checkpoint
    assert find_resume_point(str(run), str(tmp_path), "x") == (run.resolve(), good[-1].resolve())
    # explicitly naming the broken checkpoint: ConfigError naming the file and the intact ones
    with pytest.raises(ConfigError) as e:
        find_resume_point(str(bad), str(tmp_path), "x")
    assert str(e.value).startswith(f"checkpoint {bad} is not intact: {bad / 'state.json'} {problem}")
    assert str(e.value).endswith(f"; intact checkpoints of this run: {good[0]}, {good[1]} (resume={run} continues "
                                 f"from the newest)")
    with pytest.raises(ConfigError, match="is not intact"):
        read_state(bad)
    assert (bad / "state.json").read_bytes() == content            # left as it was


def test_resume_auto_falls_back_to_an_intact_checkpoint(tmp_path):
    older, newer = tmp_path / "tiny-dpo-20240101-000000", tmp_path / "tiny-dpo-20240102-000000"
    good = make_checkpoint(older, 3)
    make_checkpoint(newer, 2, b'{"counter": ')                       # the newest run: only a broken one
    write_metrics(older, [1, 2, 3, 4], TORN)
    run_dir, ckpt = find_resume_point("auto", str(tmp_path), "tiny-dpo")
    cut_to_checkpoint(run_dir, ckpt)
    assert (run_dir, ckpt) == (older.resolve(), good.resolve())
    assert [r["step"] for r in read_metrics(older)] == [1, 2, 3]
    good_newer = make_checkpoint(newer, 1)
    os.utime(good_newer, (os.path.getmtime(good) + 10,) * 2)
    assert find_resume_point("auto", str(tmp_path), "tiny-dpo") == (newer.resolve(), good_newer.resolve())


def test_run_with_only_broken_checkpoints(tmp_path):
    run = tmp_path / "run"
    bad = make_checkpoint(run, 2, b"")
    with pytest.raises(ConfigError) as e:
        find_resume_point(str(run), str(tmp_path), "x")
    assert str(e.value) == (f"resume={run}: not a checkpoint directory, nor a run directory with an intact "
                            f"checkpoint under {run / 'checkpoints'} ({bad / 'state.json'} is empty)")
    with pytest.raises(ConfigError, match=f"checkpoint {bad} is not intact: .* is empty; this run has no other "
                                          f"intact checkpoint"):
        find_resume_point(str(bad), str(tmp_path), "x")
    with pytest.raises(ConfigError, match="resume=auto: no run of 'run' with an intact checkpoint"):
        find_resume_point("auto", str(tmp_path), "run")


def test_resume_auto_with_output_root_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=f"resume=auto: output.root '{tmp_path / 'f'}' is a file, not a folder"):
        find_resume_point("auto", str(tmp_path / "f"), "x")


def test_list_checkpoints_reads_each_state_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for counter in (10, 2, 7):
        make_checkpoint(run, counter)
    reads = []
    real = Path.read_bytes

    def counting(self):
        reads.append(self)
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", counting)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read_text"))
    assert [read_state(c)["counter"] for c in list_checkpoints(run)] == [2, 7, 10]
    assert len(reads) == 3 + 3 and len(set(reads)) == 3


def test_commit_keeps_the_last_k_and_ignores_broken(tmp_path):
    run = tmp_path / "run"
    bad = make_checkpoint(run, 1, b"")
    for counter in (2, 3, 4):
        tmp = checkpoint.begin(run, f"step_{counter:06d}")
        checkpoint.commit(tmp, {"counter": counter}, keep_last=2)
    assert [c.name for c in list_checkpoints(run)] == ["step_000003", "step_000004"]
    assert bad.is_dir()


def test_resume_moves_samples_logged_after_the_checkpoint_aside(tmp_path):
    from prefopt.io.checkpoint import truncate_samples
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "prompt": "p", "response": f"r{s}"}) for s in (10, 10, 20, 30)]
    (run / "samples.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "pro')
    truncate_samples(run, 20)
    assert [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()] == [10, 10, 20]
    aside = (run / "samples.after-checkpoint.jsonl").read_text().splitlines()
    assert json.loads(aside[0])["step"] == 30 and aside[1] == '{"step": 40, "pro'
    truncate_samples(run, 20)                       # nothing after the checkpoint: unchanged
    assert len((run / "samples.after-checkpoint.jsonl").read_text().splitlines()) == 2
