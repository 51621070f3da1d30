"""Curate a preference data set with a reward model or an ensemble (``prefopt score``).

Secrets of RLHF in Large Language Models Part II (Wang et al. 2024, arXiv 2401.06080): the preference
strength of a pair is the mean over the M ensemble members of ``r_chosen - r_rejected``; its std over
members says how much they disagree. A negative mean suggests a mislabelled pair (``flip_negative``
swaps it), a mean near 0 an ambiguous one (``drop_ambiguous`` leaves out pairs with |mean| < T).

Each row is written back with all its fields, in order, followed by:

* ``reward_chosen`` / ``reward_rejected``: the mean reward over members;
* ``rewards_chosen`` / ``rewards_rejected``: each member's reward (only with 2 or more members);
* ``preference_strength``: the mean over members of ``r_c - r_r``; ``preference_strength_std``: its
  std over members (ddof 0; 0.0 for one member);
* ``margin`` (``margin_field``): the preference strength again, the per-row margin that ``reward_model``
  training reads (``data.margin_field``);
* ``flipped`` (only with ``flip_negative``): true where chosen and rejected were swapped (their rewards
  swapped too, the strength negated), false elsewhere.

A row that already has one of these fields is refused unless ``overwrite_fields`` (then the old values
are removed and the new ones appended). A multi-head reward model's heads are summed with
``attribute_weights`` (:func:`prefopt.rewards.sources.head_weights`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.errors import ConfigError, DataError, PrefoptError

FIELDS = ("reward_chosen", "reward_rejected", "rewards_chosen", "rewards_rejected", "preference_strength",
          "preference_strength_std", "flipped")
OUT_FORMATS = (".jsonl", ".json")


@dataclass
class CurationStats:
    rows: int                        # pairs scored
    members: int
    flipped: int = 0
    dropped: int = 0
    written: int = 0
    mean_strength: float = 0.0       # over all pairs, as labelled in the input
    mean_strength_std: float = 0.0
    member_accuracy: list[float] = field(default_factory=list)   # per member: fraction with r_c > r_r
    ensemble_accuracy: float = 0.0   # fraction with mean strength > 0
    agreement: float = 1.0           # fraction of pairs that every member ranks the same way

    def summary(self, models: list[str] | None = None) -> str:
        names = models or [f"member {m}" for m in range(self.members)]
        ranked = ", ".join(f"{n} {a:.3f}" for n, a in zip(names, self.member_accuracy))
        return "\n".join([
            f"scored {self.rows} pairs with {self.members} reward model(s); wrote {self.written} rows",
            f"flipped {self.flipped}, dropped {self.dropped}",
            f"mean preference strength {self.mean_strength:.4f} (mean std over members {self.mean_strength_std:.4f})",
            f"pairs ranked correctly (r_chosen > r_rejected): {ranked}; ensemble mean {self.ensemble_accuracy:.3f}",
            f"ensemble agreement (every member ranks the pair the same way): {self.agreement:.3f}"])


def check_options(drop_ambiguous: float | None, margin_field: str, chosen_field: str, rejected_field: str) -> None:
    if drop_ambiguous is not None and not drop_ambiguous >= 0:
        raise ConfigError(f"--drop-ambiguous must be a number >= 0 (got {drop_ambiguous})")
    if not margin_field or margin_field in (*FIELDS, chosen_field, rejected_field):
        raise ConfigError(f"--margin-field '{margin_field}' is a field curation writes or swaps; choose another")


def check_rows(rows: list, margin_field: str, overwrite_fields: bool, source: str | None) -> None:
    """Refuse a row that already has a field curation writes (unless ``overwrite_fields``)."""
    for i, row in enumerate(rows):
        taken = [k for k in (*FIELDS, margin_field) if isinstance(row, dict) and k in row]
        if taken and not overwrite_fields:
            raise DataError("the row already has this field, which scoring writes (--overwrite-fields replaces it)",
                            source=source, row=i, field=taken[0])


def curate(rows: list[dict], chosen_scores: list[list[float]], rejected_scores: list[list[float]], *,
           flip_negative: bool = False, drop_ambiguous: float | None = None, margin_field: str = "margin",
           chosen_field: str = "chosen", rejected_field: str = "rejected", overwrite_fields: bool = False,
           source: str | None = None) -> tuple[list[dict], CurationStats]:
    """Add the fields of the module docstring to ``rows`` (new dicts; the input is left alone), flip
    and drop pairs. ``chosen_scores`` / ``rejected_scores``: ``[M][N]`` reward of each member for each row."""
    import torch

    from prefopt.rewards.ensemble import preference_strength
    n, m = len(rows), len(chosen_scores)
    if m == 0 or len(rejected_scores) != m or any(len(s) != n for s in (*chosen_scores, *rejected_scores)):
        raise ValueError(f"chosen_scores and rejected_scores must both be [M][N] with M >= 1 and N = {n} rows")
    check_options(drop_ambiguous, margin_field, chosen_field, rejected_field)
    check_rows(rows, margin_field, overwrite_fields, source)
    chosen = torch.tensor(chosen_scores, dtype=torch.float64).reshape(m, n)
    rejected = torch.tensor(rejected_scores, dtype=torch.float64).reshape(m, n)
    stats = CurationStats(rows=n, members=m)
    if n == 0:
        return [], stats
    mean, std = preference_strength(chosen, rejected)
    diff = torch.sign(chosen - rejected)
    stats.mean_strength, stats.mean_strength_std = mean.mean().item(), std.mean().item()
    stats.member_accuracy = (diff > 0).double().mean(1).tolist()
    stats.ensemble_accuracy = (mean > 0).double().mean().item()
    stats.agreement = (diff == diff[0]).all(0).double().mean().item()
    out = []
    for i, row in enumerate(rows):
        new = {k: v for k, v in row.items() if k not in (*FIELDS, margin_field)}
        r_c, r_r, s = chosen[:, i].tolist(), rejected[:, i].tolist(), mean[i].item()
        flip = flip_negative and s < 0
        if flip:
            new[chosen_field], new[rejected_field] = row[rejected_field], row[chosen_field]
            r_c, r_r, s = r_r, r_c, -s
        if drop_ambiguous is not None and abs(s) < drop_ambiguous:
            stats.dropped += 1
            continue
        stats.flipped += flip
        new.update(reward_chosen=sum(r_c) / m, reward_rejected=sum(r_r) / m)
        if m >= 2:
            new.update(rewards_chosen=r_c, rewards_rejected=r_r)
        new.update(preference_strength=s, preference_strength_std=std[i].item())
        new[margin_field] = s
        if flip_negative:
            new["flipped"] = flip
        out.append(new)
    stats.written = len(out)
    return out, stats


def pair_inputs(rows: list, source: str, prompt_field: str = "prompt", chosen_field: str = "chosen",
                rejected_field: str = "rejected") -> tuple[list, list[str], list, list[str]]:
    """Validate every row (DataError naming file, row and field) and return what the reward models score:
    ``(chosen_prompts, chosen_texts, rejected_prompts, rejected_texts)``. A response given as chat messages
    is its last (assistant's) message, after the prompt and any messages before it (a leading copy of the
    prompt is dropped); as in training, a row with any chat messages is a conversation (a text prompt is a
    user message)."""
    from prefopt.data.examples import parse_text, strip_prompt
    out: tuple[list, list, list, list] = ([], [], [], [])
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object with fields, got {type(row).__name__}", source=source, row=i)
        for name in (prompt_field, chosen_field, rejected_field):
            if row.get(name) is None:
                raise DataError(f"missing field (found fields {[k for k, v in row.items() if v is not None]})",
                                source=source, row=i, field=name)
        prompt = parse_text(row[prompt_field], source, i, prompt_field)
        responses = [parse_text(row[name], source, i, name) for name in (chosen_field, rejected_field)]
        if isinstance(prompt, str) and any(isinstance(r, list) for r in responses):
            prompt = [{"role": "user", "content": prompt}]
        for j, (name, value) in enumerate(zip((chosen_field, rejected_field), responses)):
            if isinstance(value, list):
                if value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
                    raise DataError(f"the last message is the response: it must be the assistant's and not empty "
                                    f"(got role '{value[-1]['role']}')", source=source, row=i, field=name)
                out[2 * j].append(prompt + strip_prompt(value, prompt)[:-1])
                value = value[-1]["content"]
            else:
                out[2 * j].append(prompt)
            out[2 * j + 1].append(value)
    return out


def parse_attribute_weights(text: str | None) -> dict[str, float]:
    """``"helpfulness=1,verbosity=-0.5"`` -> ``{"helpfulness": 1.0, "verbosity": -0.5}``."""
    weights = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, _, value = (x.strip() for x in item.partition("="))
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = math.nan
        if not name or not math.isfinite(weights[name]):
            raise ConfigError(f"--attribute-weights: '{item}' is not name=number (e.g. helpfulness=1,verbosity=-0.5)")
    return weights


def check_out_path(out: str, data: str, force: bool) -> Path:
    """The output file: .jsonl / .json, not the input (nor inside an input folder), not existing unless ``force``."""
    path = Path(out).expanduser().resolve()
    if path.suffix.lower() not in OUT_FORMATS:
        raise ConfigError(f"--out {out}: the output must be a .jsonl or .json file")
    data_path = Path(data).expanduser()
    if data_path.exists():
        data_path = data_path.resolve()
        if path == data_path or (path.exists() and os.path.samefile(path, data_path)):
            raise ConfigError(f"--out {out} is the input file: write the curated rows to another file")
        if data_path.is_dir() and data_path in path.parents:
            raise ConfigError(f"--out {out} is inside the input folder {data}: it would join the data set")
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder")
    if path.exists() and not force:
        raise ConfigError(f"--out {out} exists: refusing to overwrite it (pass --force to replace it)")
    return path


def write_rows(rows: list[dict], path: Path, force: bool) -> None:
    """Write ``rows`` as JSONL (``.jsonl``) or a JSON array (``.json``), atomically, never over a file
    unless ``force``."""
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except (TypeError, ValueError):
            for key, value in row.items():
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    raise DataError("the value cannot be written as JSON", source=str(path), row=i, field=key) from None
            raise
    text = "\n".join(lines) + "\n" if path.suffix.lower() == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]\n"
    write_text(path, text, force)


def write_text(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed into place), never over an existing
    file unless ``force`` (ConfigError naming ``--out``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if not force:
            try:
                os.link(tmp, path)      # fails if the file appeared meanwhile: never overwritten
                return
            except FileExistsError:
                raise ConfigError(f"--out {path} exists: refusing to overwrite it (pass --force)") from None
            except OSError:             # no hard links on this file system
                if path.exists():
                    raise ConfigError(f"--out {path} exists: refusing to overwrite it (pass --force)") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def reward_models(models: list[str], runs_root: str, attribute_weights: dict[str, float] | None = None,
                  trust_remote_code: bool = False, flag: str = "--reward") -> tuple[list[str], list[list[float]]]:
    """Resolve and check outcome reward models named on the command line (a path, hub name, ``builtin:``
    name or ``run:NAME``, :func:`prefopt.io.run_dir.run_model`) before anything loads them; returns their
    resolved paths and each one's head weights (``attribute_weights`` by head name, see
    :func:`prefopt.rewards.sources.head_weights`). A process reward model is refused. Shared by
    ``prefopt score`` and ``prefopt eval``."""
    from prefopt.io.run_dir import run_model
    from prefopt.models.check import check_model
    from prefopt.rewards.scorer import reward_metadata
    from prefopt.rewards.sources import head_weights
    paths = [check_model(run_model(p, runs_root, flag), trust_remote_code=trust_remote_code, what=flag,
                         head="sequence_classification") for p in models]
    metas = [reward_metadata(p) for p in paths]
    for meta, shown in zip(metas, models):
        if meta["kind"] == "process":
            raise ConfigError(f"{flag} {shown} is a process reward model (it scores steps), not an outcome one")
    weights = [head_weights(meta["heads"], attribute_weights or {}, f"reward model {shown}", "--attribute-weights")
               for meta, shown in zip(metas, models)]
    return paths, weights


def score_file(data: str, models: list[str], out: str, *, split: str = "train", prompt_field: str = "prompt",
               chosen_field: str = "chosen", rejected_field: str = "rejected", margin_field: str = "margin",
               flip_negative: bool = False, drop_ambiguous: float | None = None, overwrite_fields: bool = False,
               attribute_weights: dict[str, float] | None = None, batch_tokens: int = 8192, runs_root: str = "runs",
               trust_remote_code: bool = False, force: bool = False) -> CurationStats:
    """Load ``data``, validate every row, check the models, score, curate and write ``out`` (see the module
    docstring). Everything that can be refused is refused before a model is loaded."""
    from prefopt import console
    from prefopt.data.loading import load_rows
    from prefopt.rewards.scorer import RewardScorer
    if not models:
        raise ConfigError("--reward needs at least one reward model")
    if batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be >= 1 (got {batch_tokens})")
    if len({prompt_field, chosen_field, rejected_field}) < 3:
        raise ConfigError("--prompt-field, --chosen-field and --rejected-field must differ")
    check_options(drop_ambiguous, margin_field, chosen_field, rejected_field)
    path = check_out_path(out, data, force)
    rows, source = load_rows(data, split)
    check_rows(rows, margin_field, overwrite_fields, source)
    c_prompts, c_texts, r_prompts, r_texts = pair_inputs(rows, source, prompt_field, chosen_field, rejected_field)
    paths, weights = reward_models(models, runs_root, attribute_weights, trust_remote_code)
    console.status(f"scoring {len(rows)} pairs with {len(paths)} reward model(s)")
    scores = RewardScorer(paths, trust_remote_code=trust_remote_code, batch_tokens=batch_tokens).score(
        c_prompts + r_prompts, c_texts + r_texts)
    n = len(rows)
    combined = [[sum(h * w for h, w in zip(s, ws)) for s in member] for member, ws in zip(scores, weights)]
    for j, member in enumerate(combined):
        bad = next((i for i, v in enumerate(member) if not math.isfinite(v)), None)
        if bad is not None:
            raise PrefoptError(f"reward model {models[j]} gave {member[bad]} for row {bad % n} "
                               f"({'chosen' if bad < n else 'rejected'}) of {source}")
    out_rows, stats = curate(rows, [c[:n] for c in combined], [c[n:] for c in combined], flip_negative=flip_negative,
                             drop_ambiguous=drop_ambiguous, margin_field=margin_field, chosen_field=chosen_field,
                             rejected_field=rejected_field, overwrite_fields=overwrite_fields, source=source)
    write_rows(out_rows, path, force)
    return stats
