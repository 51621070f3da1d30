"""Evaluation of a model's generations with reward sources, against a baseline (``prefopt eval``).

* :mod:`prefopt.evaluation.winrate`: win rate and length-controlled win rate (pure, numpy);
* :mod:`prefopt.evaluation.report`: :func:`~prefopt.evaluation.report.summarize`, metrics and
  per-sample records of responses already generated and scored (what a training loop's periodic
  evaluation calls too);
* :mod:`prefopt.evaluation.inputs`: the command's checks before Ray starts;
* :mod:`prefopt.evaluation.cli_eval`: :func:`~prefopt.evaluation.cli_eval.evaluate`, the command
  itself (prompts, vLLM engines and reward actors on Ray, the output folder).
"""
