"""Write the second training corpus: the ``.py`` files of this Python's standard library, in one UTF-8 file.

The files under the standard library folder, without ``test/`` folders and
``site-packages``, joined in sorted path order (each file's text as it is, then
a newline), so that a run holds out the last 10% of the library as its
validation tail. ``python -m benchmarks.stdlib_corpus OUT.txt`` prints the
file count and size; docs/training.md uses it for its second corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

SKIP_DIRS = {"test", "tests", "site-packages", "__pycache__"}


def library_files(root: str) -> list[str]:
    """Every ``.py`` under ``root`` outside the skipped folders, sorted by path relative to ``root``."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
    return sorted(found, key=lambda path: os.path.relpath(path, root))


def write_corpus(root: str, out: str) -> tuple[int, int]:
    """Join the files into ``out`` (UTF-8; undecodable bytes replaced); returns (files, characters)."""
    files = library_files(root)
    chars = 0
    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as src:
                text = src.read()
            f.write(text + "\n")
            chars += len(text) + 1
    return len(files), chars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stdlib_corpus", description=__doc__)
    parser.add_argument("out", help="the text file to write")
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="the standard library folder")
    args = parser.parse_args(argv)
    files, chars = write_corpus(args.root, args.out)
    print(f"{args.out}: {files} files, {chars} characters, {os.path.getsize(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
