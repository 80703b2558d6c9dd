"""Reading a model version's card (model.json) as a file from outside: whatever it holds, a card
or one ModelError line, before anything is built from it."""

from __future__ import annotations

import json
from pathlib import Path

from pneumo.errors import ModelError

MAX_NAME_CHARS = 128  # a card's name and version: in every answer of serve and every SR


def read_card(path) -> dict:
    """The card at path, {} when there is none. One without a name and version (predict and serve
    name the model by them), not JSON or nested past Python's limit is a ModelError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model card ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    try:
        card = json.loads(text)
    except RecursionError:
        raise ModelError(f"{path}: not a model card (JSON nested too deeply)") from None
    except ValueError as exc:
        raise ModelError(f"{path}: not a model card (not JSON: {str(exc)[:200]})") from None
    good = [
        isinstance(card, dict) and isinstance(card.get(k), str) and 0 < len(card[k].strip()) <= MAX_NAME_CHARS
        for k in ("name", "version")
    ]
    if not all(good):
        raise ModelError(
            f"{path}: a model card needs a 'name' and a 'version', each a string of 1 to "
            f"{MAX_NAME_CHARS} characters, as an export writes them)"
        )
    return card
