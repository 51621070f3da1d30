"""DailyDialog -> the prompt JSONL of recipes/papers/constrained_dailydialog_gpt2.yaml.

    python docs/examples/prepare_daily_dialog.py --out data/daily_dialog   # needs hub access (datasets)

Like RL4LMs' DailyDialog task: every utterance after the first becomes one row whose prompt is up to
``--context`` previous utterances joined with " <EOU> ", whose reference is that utterance, and whose
intent is its dialogue-act label minus one (DailyDialog's acts: 1 inform, 2 question, 3 directive,
4 commissive -> classifier classes 0-3).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def dialog_rows(dialog: list[str], acts: list[int], context: int) -> list[dict]:
    rows = []
    for i in range(1, len(dialog)):
        history = [u.strip() for u in dialog[max(0, i - context):i]]
        rows.append({"prompt": " <EOU> ".join(history) + " <EOU>", "reference": dialog[i].strip(),
                     "intent": int(acts[i]) - 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/daily_dialog")
    ap.add_argument("--context", type=int, default=5)
    args = ap.parse_args()
    from datasets import load_dataset
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        data = load_dataset("daily_dialog", split=split)
        with open(out / f"{split}.jsonl", "w") as f:
            for ex in data:
                for row in dialog_rows(ex["dialog"], ex["act"], args.context):
                    f.write(json.dumps(row) + "\n")
        print(f"{split}: {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
