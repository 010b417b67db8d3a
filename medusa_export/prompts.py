"""Prompt and text files: JSONL rows (`prompt`, or the first of `turns` as in Spec-Bench) for validate, bench
and training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medusa_runtime.errors import MedusaError


def row_prompt(row: dict[str, Any]) -> str | None:
    """A row's `prompt`, else the first of its `turns`; None when neither is a non-empty string."""
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("turns"), list) and row["turns"]:
        prompt = row["turns"][0]
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped), with a one-line error for a bad line."""
    if not path.is_file():
        raise MedusaError(f"file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise MedusaError(f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            json.dumps(row, ensure_ascii=False).encode("utf-8")  # "\ud800" escapes decode to lone surrogates
        except (ValueError, UnicodeEncodeError) as error:
            reason = (
                "a lone surrogate (\\uD800-\\uDFFF) is not text"
                if isinstance(error, UnicodeEncodeError)
                else error
            )
            raise MedusaError(f"{path}:{number}: not valid JSON text: {reason}") from None
        if not isinstance(row, dict):
            raise MedusaError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def read_prompts(
    path: Path,
    limit: int | None = None,
    per_category: int | None = None,
    min_tokens: int = 0,
    encode: Callable[[str], list[int]] | None = None,
) -> list[dict]:
    """[{'id', 'category', 'prompt'}] from a JSONL file of `prompt` or `turns` rows: the first `limit`
    rows, or the first `per_category` rows of every category, of those at least `min_tokens` long by
    `encode` (a tokenizer's; needed only with min_tokens)."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"prompts file {path} does not exist")
    rows = []
    for n, row in enumerate(read_jsonl(path), 1):
        prompt = row_prompt(row)
        if prompt is None:
            raise MedusaError(f"{path}: row {n} has neither a 'prompt' string nor a non-empty 'turns' list")
        if min_tokens > 0 and len(encode(prompt)) < min_tokens:
            continue
        category = row.get("category", "all")
        if per_category and sum(r["category"] == category for r in rows) >= per_category:
            continue
        rows.append({"id": row.get("question_id", n), "category": category, "prompt": prompt})
        if limit and len(rows) >= limit:
            break
    if not rows:
        longer = f" of {min_tokens} tokens or more" if min_tokens > 0 else ""
        raise MedusaError(f"{path} holds no prompts{longer}")
    return rows
