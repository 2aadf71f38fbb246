"""Usage errors (unknown option or command, a bad value, a missing argument) are one line on stderr, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from featstore.cli import main; main()", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "80"})


def test_usage_errors_are_one_line_and_help_still_works(tmp_path):
    cases = [
        (["query", str(tmp_path), "--split", "test", "--top-k", "x"], "Invalid value for '--top-k'"),
        (["probe", str(tmp_path), "--train-split", "a", "--test-split", "b", "--C", "0x10"], "Invalid value for '--C'"),
        (["verify", str(tmp_path), "--frobnicate"], "No such option: --frobnicate"),
        (["info"], "Missing argument"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
    ]
    for args, message in cases:
        result = run(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.returncode, result.stderr)
        assert lines[0].startswith("featstore: error: ") and message in lines[0] and "--help" in lines[0], lines
        assert result.stdout == ""
    helped = run("info", "--help")
    assert helped.returncode == 0 and "Usage" in helped.stdout and "--failures" in helped.stdout
