"""The README's code blocks, for CI (.ci/run runs the set-up commands as written) and for
tests/test_readme.py (which runs the usage blocks in order).

    python scripts/readme_blocks.py --setup                      the two set-up commands, one a line
    python scripts/readme_blocks.py --section TITLE --first-line the first command of a section's first block

Standard library only: CI runs it before anything is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SETUP_SECTION = "Set-up: two commands"


@dataclass
class Block:
    section: str  # the nearest heading above the block, without the #'s
    language: str  # the fence's info string: bash, python, ...
    text: str
    line: int  # 1-based line of the opening fence in README.md

    def commands(self) -> list[str]:
        """A shell block's commands: one a line, comments and blank lines dropped."""
        out = []
        for raw in self.text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                out.append(line)
        return out


def blocks(path: Path = README) -> list[Block]:
    found, section, fence, body, start = [], "", None, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            heading = re.match(r"#{1,6}\s+(.*)", line)
            if heading:
                section = heading.group(1).strip()
            opening = re.match(r"```(\w*)\s*$", line)
            if opening:
                fence, body, start = opening.group(1), [], number
        elif line.strip() == "```":
            found.append(Block(section, fence, "\n".join(body) + "\n", start))
            fence = None
        else:
            body.append(line)
    return found


def section_blocks(title: str, path: Path = README) -> list[Block]:
    return [b for b in blocks(path) if b.section == title]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="print the set-up block's commands")
    p.add_argument("--section", help="a section title (heading text)")
    p.add_argument("--first-line", action="store_true", help="with --section: only its first command")
    args = p.parse_args(argv)
    if args.setup == bool(args.section):
        p.error("give exactly one of --setup, --section")
    title = SETUP_SECTION if args.setup else args.section
    shell = [b for b in section_blocks(title) if b.language in ("bash", "sh", "shell")]
    if not shell:
        print(f"README.md has no shell block under a heading {title!r}", file=sys.stderr)
        return 2
    commands = shell[0].commands()
    print("\n".join(commands[:1] if args.first_line else commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
