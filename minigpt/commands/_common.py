"""What the commands share: their output (with ``--json`` stdout holds exactly one JSON object and
the lines meant for a person go to stderr) and building a class from options."""

from __future__ import annotations

import json
import sys
from typing import Any

from minigpt.errors import UserError


class Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def say(self, *lines: str) -> None:
        """Lines for a person: stdout, or stderr when stdout is reserved for the JSON object."""
        print(*lines, sep="\n", file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def result(self, obj: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(obj))


def construct(cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``, its argument checks (ValueError/TypeError at the boundary) as a `UserError`."""
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(str(err).strip().splitlines()[0]) from err
