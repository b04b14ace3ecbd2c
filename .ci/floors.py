"""Print the lowest allowed version of each runtime dependency in pyproject.toml as a pin, one a line.

    python3 .ci/floors.py --except torch   ->   lightning==2.4.0  jsonargparse[signatures]==4.27.7  ...

.ci/run installs these to test the floors the package declares, so a changed floor needs no CI edit.
A dependency without a ``>=`` bound is printed as it is written.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?)\s*(?P<spec>[^;]*)(?P<marker>;.*)?$")


def floor_pin(requirement: str) -> str:
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"floors.py: cannot read the requirement {requirement!r}")
    lows = [s.strip()[2:].strip() for s in match["spec"].split(",") if s.strip().startswith(">=")]
    if not lows:
        return requirement
    return f"{match['name']}=={lows[0]}{match['marker'] or ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--except", dest="skip", nargs="*", default=[], help="distribution names to leave out")
    parser.add_argument("--pyproject", default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    args = parser.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text(encoding="utf-8"))["project"]
    skip = {name.lower() for name in args.skip}
    for requirement in project["dependencies"]:
        name = REQUIREMENT.match(requirement)["name"].split("[")[0].lower()
        if name not in skip:
            print(floor_pin(requirement))


if __name__ == "__main__":
    main()
