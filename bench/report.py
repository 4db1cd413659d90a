"""What every benchmark script shares: the machine's facts and docs/benchmarks.md's sections."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(len(os.sched_getaffinity(0)))


def write_section(heading: str, section: str, doc: Path = DOC) -> None:
    """Replace the lines from `heading` up to the next `## ` heading (or append the section)."""
    if doc.exists():
        lines = doc.read_text().splitlines()
    else:
        lines = [
            "# Benchmarks",
            "",
            "Measured figures for Heron. Each section below is written by the script it names; "
            "rerun the script to refresh it (other sections are left alone).",
            "",
        ]
    new = [*section.rstrip("\n").splitlines(), ""]
    try:
        start = lines.index(heading)
    except ValueError:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = new
    while lines and not lines[-1].strip():
        lines.pop()
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
