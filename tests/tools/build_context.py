"""The image's build context: which files `docker build` or `podman build` would send, read from
`.dockerignore` with Docker's own matching rules (not fnmatch: Docker's `*` stops at `/`).

Only the pattern forms the repository's `.dockerignore` uses are understood; any other form is an
error, so a new form cannot be misread silently.

    python -m tests.tools.build_context   # fails unless the context holds the package, no harness
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llm_usage"
# The harnesses: in the wheel, for `llm-usage bench` and `soak`; never in the image.
HARNESSES = ("llm_usage/bench", "llm_usage/soak", "llm_usage/testing")

Patterns = list[tuple[bool, str]]


class UnsupportedPatternError(ValueError):
    """A `.dockerignore` line this reader does not understand."""


def dockerignore_patterns(text: str) -> Patterns:
    """(exclude?, pattern) in file order, comments and blank lines left out."""
    patterns = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if not re.fullmatch(r"[\w.*/-]+", pattern):
            raise UnsupportedPatternError(f"unsupported .dockerignore pattern {line!r}")
        patterns.append((exclude, pattern))
    return patterns


def dockerignore_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or one of its parent folders; `**` any depth."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
    return any(re.fullmatch(regex, candidate) for candidate in candidates)


def in_build_context(patterns: Patterns, path: str) -> bool:
    """Whether `path` (relative, `/`-separated) is sent: the last pattern matching it decides."""
    included = True
    for exclude, pattern in patterns:
        if dockerignore_matches(pattern, path):
            included = not exclude
    return included


def _may_let_back_in(patterns: Patterns, folder: str) -> bool:
    """Whether some `!pattern` could name a path below `folder` (else an excluded folder is
    skipped whole, as Docker does)."""
    return any(
        not exclude and (pattern.startswith(folder + "/") or "*" in pattern.split("/")[0])
        for exclude, pattern in patterns
    )


def build_context(root: Path = ROOT) -> list[str]:
    """The relative paths of the files (symbolic links included, not followed) the build sends."""
    patterns = dockerignore_patterns((root / ".dockerignore").read_text(encoding="utf-8"))
    sent = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        subfolders[:] = sorted(
            name
            for name in subfolders
            if in_build_context(patterns, prefix + name)
            or _may_let_back_in(patterns, prefix + name)
        )
        linked = [name for name in subfolders if (Path(folder) / name).is_symlink()]
        sent += [
            prefix + name for name in [*files, *linked] if in_build_context(patterns, prefix + name)
        ]
        subfolders[:] = [name for name in subfolders if name not in linked]
    return sorted(sent)


def is_harness(path: str) -> bool:
    return any(path == folder or path.startswith(folder + "/") for folder in HARNESSES)


def context_problems(context: list[str]) -> list[str]:
    """What is wrong with a build context: a harness inside, or the package missing."""
    problems = [
        f"a harness file is in the image's build context: {path}"
        for path in context
        if is_harness(path)
    ]
    if f"{PACKAGE}/__init__.py" not in context:
        problems.append(f"the package {PACKAGE}/ is not in the image's build context")
    return problems


def main() -> int:
    context = build_context()
    problems = context_problems(context)
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if problems:
        return 1
    package = sum(1 for path in context if path.startswith(PACKAGE + "/"))
    sys.stdout.write(
        f"build context ok: {len(context)} files, {package} of them in {PACKAGE}/, "
        f"none under {', '.join(HARNESSES)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
