"""The entrypoint of a job from `p5ray submit`: `python -m p5ray.jobentry VERB ARGS...`.

Runs `python -m p5ray.cli VERB ARGS...` and writes each line of its stdout with STDOUT_MARK in
front; its stderr passes through. A Ray Job has one log for both streams, so the mark is how
`p5ray submit` gives the verb's stdout (results) back on stdout and the rest on stderr. Lines Ray
forwards from other processes to the driver's stdout (`(raylet) ...`, `(SomeActor pid=7) ...`)
are logs, not results: they go to stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from p5ray.submit import STDOUT_MARK

FORWARDED = re.compile(rb"^(\x1b\[[0-9;]*m)*\((raylet|autoscaler|pid=\d+|[\w.]+ pid=\d+)")


def main(argv: list[str]) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, "-m", "p5ray.cli", *argv], stdout=subprocess.PIPE, env=env)
    mark = STDOUT_MARK.encode()
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for line in child.stdout:  # a job stop signals the whole process tree; no forwarding needed
        line = line if line.endswith(b"\n") else line + b"\n"
        if FORWARDED.match(line):
            err.write(line)
            err.flush()
        else:
            out.write(mark + line)
            out.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
