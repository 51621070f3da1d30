"""curves.png: a run's main metrics over steps (prefopt.io.plots). Pure: no Ray."""
import json
import logging
import math
import time

import pytest

from prefopt.io.plots import curve_keys, curves_figure, series, summary_trend, write_curves
from prefopt.io.run_dir import MetricsLogger, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def offline_run(path):
    path.mkdir(parents=True, exist_ok=True)
    log = MetricsLogger(path, loggers=[])
    log.log(0, {"time_s": 1.0, "examples": 10}, prefix="reference")
    log.log(0, {"loss": 0.69, "rewards/accuracy": 0.5, "rewards/margin": 0.0}, prefix="eval")
    for step in range(1, 31):
        log.log(step, {"loss": 0.7 - 0.02 * step, "rewards/accuracy": min(1.0, 0.5 + 0.02 * step),
                       "rewards/margin": 0.1 * step, "rewards/chosen": 0.05 * step, "grad_norm": 1.0, "lr": 1e-3})
    log.log(30, {"loss": 0.2, "rewards/accuracy": 0.95, "rewards/margin": 2.0}, prefix="eval")
    log.close()
    return path


def online_run(path, iterations=8):
    path.mkdir(parents=True, exist_ok=True)
    log = MetricsLogger(path, loggers=[])
    for it in range(1, iterations + 1):
        log.log(it, {"reward/mean": 0.1 * it, "reward/std": 0.3, "reward/format": 0.5, "kl": 0.01 * it,
                     "policy/kl_loss": 0.02 * it, "policy/approx_kl": 0.001, "policy/entropy": 2.0 - 0.1 * it,
                     "policy/clip_frac": 0.1, "response_length": 20.0 + it, "loss": -0.1 * it,
                     "time/generate": 0.5, "tokens_per_s": 100.0})
    log.close()
    return path


OFFLINE_KEYS = ["train/loss", "eval/loss", "eval/rewards/accuracy", "train/rewards/margin"]
ONLINE_KEYS = ["train/reward/mean", "train/kl", "train/policy/kl_loss", "train/policy/entropy",
               "train/response_length", "train/loss"]


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_curve_keys_offline_and_online(tmp_path):
    assert curve_keys(read_metrics(offline_run(tmp_path / "off"))) == OFFLINE_KEYS
    assert curve_keys(read_metrics(online_run(tmp_path / "on"))) == ONLINE_KEYS


def test_curve_keys_only_what_exists():
    records = [{"step": 1, "split": "train", "loss": 0.5, "ranking/accuracy": 0.3},
               {"step": 2, "split": "train", "loss": None, "ranking/accuracy": 0.6}]
    assert curve_keys(records) == ["train/loss", "train/ranking/accuracy"]   # no eval: the train accuracy
    online = [{"step": 1, "split": "train", "reward/mean": 1.0, "response_length": None},
              {"step": 1, "split": "sync_check", "loss": 3.0}]
    assert curve_keys(online) == ["train/reward/mean"]                      # never finite: no panel
    assert curve_keys([]) == []
    assert curve_keys([{"step": 0, "split": "reference", "time_s": 1.0}]) == []


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_write_curves_png(tmp_path, kind):
    run = (offline_run if kind == "offline" else online_run)(tmp_path / "run")
    start = time.perf_counter()
    path = write_curves(run)
    assert time.perf_counter() - start < 2.0 or kind == "offline"       # the first call imports matplotlib
    assert path == run / "curves.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert [p.name for p in run.iterdir() if p.name.endswith(".part")] == []
    expected = OFFLINE_KEYS if kind == "offline" else ONLINE_KEYS
    fig = curves_figure(read_metrics(run))
    assert titles(fig) == expected
    assert fig.axes[0].get_xlabel() == ("step" if kind == "offline" else "iteration")


def test_write_curves_is_fast(tmp_path):
    run = online_run(tmp_path / "run", iterations=500)
    write_curves(online_run(tmp_path / "warm"))                          # matplotlib imported
    start = time.perf_counter()
    assert write_curves(run) is not None
    assert time.perf_counter() - start < 2.0


def test_explicit_keys(tmp_path):
    run = offline_run(tmp_path / "run")
    records = read_metrics(run)
    fig = curves_figure(records, ["eval/loss", "grad_norm", "rewards/chosen", "missing", "eval/missing"])
    assert titles(fig) == ["eval/loss", "train/grad_norm", "train/rewards/chosen"]
    assert write_curves(run, keys=["missing"]) is None and not (run / "curves.png").exists()
    steps, values = series(records, "loss", "eval")
    assert steps == [0, 30] and values == [0.69, 0.2]


def test_nothing_to_plot_gives_none(tmp_path):
    assert write_curves(tmp_path) is None                                  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text("")
    assert write_curves(tmp_path) is None                                  # no records
    MetricsLogger(tmp_path, loggers=[]).log(0, {"time_s": 2.0}, prefix="reference")
    assert write_curves(tmp_path) is None
    assert not (tmp_path / "curves.png").exists()


def test_killed_run_with_torn_last_line_still_plots(tmp_path):
    run = online_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "split": "tra')
    assert write_curves(run).read_bytes()[:8] == PNG_MAGIC


def test_best_effort_logs_instead_of_raising(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1}\nbroken\n'
                                            '{"step": 2, "split": "train", "loss": 1}\n')
    with pytest.raises(Exception, match="line 2 is not a metrics record"):
        write_curves(tmp_path)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        assert write_curves(tmp_path, best_effort=True) is None
    assert "could not draw curves.png" in caplog.text and "line 2" in caplog.text


def test_nan_values_leave_gaps(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "split": "train", "reward/mean": 0.5}, {"step": 2, "split": "train", "reward/mean": None},
        {"step": 3, "split": "train", "reward/mean": 0.7}]))
    steps, values = series(read_metrics(tmp_path), "reward/mean")
    assert steps == [1, 2, 3] and values[0] == 0.5 and math.isnan(values[1])
    assert write_curves(tmp_path) is not None


def test_summary_trend(tmp_path):
    records = read_metrics(online_run(tmp_path / "run"))
    assert summary_trend(records, "reward/mean") == pytest.approx((0.1, 0.8))
    assert summary_trend(records, "response_length") == (21.0, 28.0)
    assert summary_trend(records, "missing") is None
    mixed = [{"step": 1, "split": "train", "kl": None}, {"step": 2, "split": "eval", "kl": 9.0},
             {"step": 3, "split": "train", "kl": 0.2}, {"step": 4, "split": "train"},
             {"step": 5, "split": "train", "kl": 0.4}, {"step": 6, "split": "train", "kl": None}]
    assert summary_trend(mixed, "kl") == (0.2, 0.4)
    assert summary_trend(mixed, "kl", split="eval") == (9.0, 9.0)
    assert summary_trend([{"step": 1, "split": "train", "kl": None}], "kl") is None
