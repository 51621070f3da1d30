"""Split a sampled response into reasoning steps and find the token where each step ends.

A step ends at the first token whose decoded text completes an occurrence of the delimiter (e.g.
``"\\n"``); text after the last delimiter forms a final step ending at the last token. Process
rewards are placed on those tokens (``place_step_rewards``).
"""
from __future__ import annotations


def split_steps(token_ids: list[int], tokenizer, delimiter: str) -> tuple[list[str], list[int]]:
    """``(steps, end_positions)``: the text of each step and the index (into ``token_ids``) of its last token.

    Steps are the pieces of the decoded response between delimiters (delimiter excluded, empty
    pieces dropped with their delimiter); positions are non-decreasing.
    """
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    steps, ends = [], []
    text_so_far = ""
    step_start = 0          # character offset where the current step starts
    for i in range(len(token_ids)):
        text_so_far = tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True)
        while True:
            cut = text_so_far.find(delimiter, step_start)
            if cut < 0:
                break
            piece = text_so_far[step_start:cut]
            if piece.strip():
                steps.append(piece.strip())
                ends.append(i)
            step_start = cut + len(delimiter)
    tail = text_so_far[step_start:]
    if tail.strip() and token_ids:
        steps.append(tail.strip())
        ends.append(len(token_ids) - 1)
    return steps, ends
