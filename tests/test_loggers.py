"""Experiment loggers (output.loggers): metrics and sampled completions written through MetricsLogger
to TensorBoard, W&B (offline) and MLflow (file store in the run folder), read back with each library's
own reader; secrets never reach a file; unknown or uninstalled loggers are recipe errors.

One run with all three loggers is shared by the module (W&B starts a service process on its first run)."""
import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from prefopt.config import load_recipe
from prefopt.errors import ConfigError
from prefopt.io.run_dir import MetricsLogger, read_metrics

SECRET = "hf_fakeSecretValue1234567890"
WANDB_SECRET = "wandb-fake-key-0123456789abcdef"
TRAIN = {1: {"loss": 0.7, "rewards/accuracy": 0.5}, 2: {"loss": 0.6, "rewards/accuracy": 0.75},
         3: {"loss": 0.5, "rewards/accuracy": 1.0}}
EVAL = {"rewards/accuracy": 0.9, "kl(coef)": 0.25, "margin": math.nan}
SAMPLES = [{"prompt": "2+2?", "response": "4 | four\nyes", "reward": 1.0, "components": {"fmt": 0.5}},
           {"prompt": "3+3?", "response": "7", "reward": math.nan, "length": 1}]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run folder after three train steps, an evaluation and one sample table, logged to all three
    loggers; W&B's folders outside the run (cache, config, artifacts staging) go to a temp folder."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-20260101-000000"
    run_dir.mkdir()
    home = tmp_path_factory.mktemp("wandb-home")
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        mp.setenv(var, "")      # recorded, so that undo() restores the variable (or its absence)
        mp.delenv(var)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(home / var.lower()))
    recipe = load_recipe("tiny_dpo", ["name=tiny", "output.loggers=[tensorboard, wandb, mlflow]",
                                      f"ray.env.HF_TOKEN={SECRET}", f"ray.env.WANDB_API_KEY={WANDB_SECRET}"])
    from prefopt.config import recipe_to_dict
    logger = MetricsLogger(run_dir, recipe.output.loggers, config=recipe_to_dict(recipe), run_name=run_dir.name)
    try:
        for step in (1, 2):
            logger.log(step, TRAIN[step])
        logger.log_samples(2, SAMPLES)
        logger.log(3, TRAIN[3])
        logger.log(3, EVAL, prefix="eval")
    finally:
        logger.close()
    yield run_dir
    mp.undo()


def test_metrics_jsonl_keeps_its_format(logged):
    train, evals = read_metrics(logged, "train"), read_metrics(logged, "eval")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0] == {"step": 1, "split": "train", "loss": 0.7, "rewards/accuracy": 0.5}
    assert evals == [{"step": 3, "split": "eval", "rewards/accuracy": 0.9, "kl(coef)": 0.25, "margin": None}]


def test_samples_jsonl_round_trip(logged):
    rows = [json.loads(line) for line in (logged / "samples.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "prompt": "2+2?", "response": "4 | four\nyes", "reward": 1.0,
                     "components": {"fmt": 0.5}},
                    {"step": 2, "prompt": "3+3?", "response": "7", "reward": None, "length": 1}]


def test_tensorboard_round_trip(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(logged / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([0.7, 0.6, 0.5])
    assert [(e.step, e.value) for e in events.Scalars("eval/kl(coef)")] == [(3, 0.25)]
    assert "eval/margin" not in events.Tags()["scalars"]          # NaN: only in metrics.jsonl, as null
    (text,) = events.Tensors("samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 2 and "| step | prompt | response | reward | components | length |" in table
    assert "4 \\| four<br>yes" in table and '{"fmt": 0.5}' in table


def wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file: LevelDB-log framing (a 7-byte ':W&B' header, 32 KiB
    blocks, 7-byte chunk headers: CRC-32 of type + data, length, type) around W&B's own protobuf
    ``Record`` messages (wandb.proto.wandb_internal_pb2)."""
    from wandb.proto import wandb_internal_pb2
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, pending = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if left < header or (crc, length, kind) == (0, 0, 0):     # the padded end of a block
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos, pending = pos + header + length, pending + chunk
        if kind in (1, 4):          # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_inside_the_run_folder(logged):
    (run_file,) = (logged / "wandb").glob("offline-run-*/run-*.wandb")
    history, run = {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":
            run = record.run
    assert run.display_name == logged.name and run.project == "prefopt"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["name"] == "tiny" and config["ray"]["env"] == {"HF_TOKEN": "***redacted***",
                                                                  "WANDB_API_KEY": "***redacted***"}
    assert {step: row["train/loss"] for step, row in history.items() if "train/loss" in row} == \
        {1: 0.7, 2: 0.6, 3: 0.5}
    assert history[3]["eval/kl(coef)"] == 0.25 and "eval/margin" not in history[3]
    assert history[2]["samples/_type"] == "table-file"
    table = json.loads((run_file.parent / "files" / history[2]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "response", "reward", "components", "length"]
    assert table["data"][0][:4] == [2, "2+2?", "4 | four\nyes", 1.0]


def test_mlflow_run_in_a_file_store_inside_the_run_folder(logged):
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=(logged / "mlflow").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == logged.name and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/kl_coef_")] == [(3, 0.25)]
    assert "eval/margin" not in run.data.metrics
    params = run.data.params
    assert params["name"] == "tiny" and float(params["train.lr"]) == load_recipe("tiny_dpo").train.lr
    assert params["ray.env.HF_TOKEN"] == "***redacted***"
    assert params["output.loggers"] == '["tensorboard", "wandb", "mlflow"]'
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/step_000002.json",
                                                      str(logged.parent / "download"))).read_text())
    assert table["columns"][:4] == ["step", "prompt", "response", "reward"]
    assert table["data"][1][:3] == [2, "3+3?", "7"]


def test_no_secret_reaches_any_file_of_the_run(logged):
    files = [p for p in logged.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path


def test_mlflow_names_are_made_valid():
    from prefopt.io.loggers import flat_params, mlflow_name
    assert mlflow_name("train/kl(coef)") == "train/kl_coef_"
    assert mlflow_name("a//b/") == "a/b" and mlflow_name("../x") == "__/x" and mlflow_name("") == "_"
    assert mlflow_name("x" * 300) == "x" * 250
    params = flat_params({"train": {"lr": 1e-5, "adam_betas": [0.9, 0.99], "note": "a" * 7000},
                          "roles": {"reward": {"sources": [{"fn": "m:f", "weight": 1.0}]}}, "ray": {"env": {}}})
    assert params == {"train.lr": "1e-05", "train.adam_betas": "[0.9, 0.99]", "train.note": "a" * 6000,
                      "roles.reward.sources.0.fn": "m:f", "roles.reward.sources.0.weight": "1.0", "ray.env": "{}"}


def test_a_failed_run_is_marked_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MetricsLogger(tmp_path, ["mlflow"], config={"name": "failing"})
    with pytest.raises(RuntimeError):
        try:
            logger.log(1, {"loss": 1.0})
            raise RuntimeError("a step failed")
        finally:
            logger.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == tmp_path.name


def test_a_logger_that_fails_is_dropped_with_a_warning(tmp_path, caplog):
    class Broken:
        closed = False

        def log(self, step, metrics, prefix):
            raise OSError("tracking server unreachable")

        def close(self, failed=False):
            Broken.closed = True

    logger = MetricsLogger(tmp_path, [])
    logger.backends["broken"] = Broken()
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert logger.backends == {} and Broken.closed
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5]
    assert "logger 'broken' failed (OSError: tracking server unreachable)" in caplog.text


def test_no_loggers_writes_only_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, [])
    logger.log(0, {"loss": 1.0})
    logger.log_samples(0, [{"prompt": "p", "response": "r", "reward": 0.0}])
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples.jsonl"]


def test_unknown_logger_names_the_entry_and_the_closest_name():
    with pytest.raises(ConfigError, match=r"override: 'output.loggers\[1\]' is 'wandbb', which is not a logger "
                                          r"\(did you mean 'wandb'\?\); available: mlflow, tensorboard, wandb"):
        load_recipe("tiny_dpo", ["output.loggers=[tensorboard, wandbb]"])
    with pytest.raises(ConfigError, match=r"'output.loggers\[1\]': 'mlflow' is listed twice"):
        load_recipe("tiny_dpo", ["output.loggers=[mlflow, mlflow]"])
    assert load_recipe("tiny_dpo", ["output.loggers=[]"]).output.loggers == []
    assert load_recipe("tiny_dpo").output.loggers == ["tensorboard"]


def test_a_logger_whose_library_is_missing_fails_before_ray(monkeypatch):
    import importlib.util

    from prefopt.preflight import prepare
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    recipe = load_recipe("tiny_dpo", ["output.loggers=[tensorboard, mlflow]"])
    with pytest.raises(ConfigError, match=r"output.loggers: 'mlflow' logs through the 'mlflow' library, which is not "
                                          r"installed here; install it with: pip install 'prefopt\[mlflow\]'"):
        prepare(recipe)
