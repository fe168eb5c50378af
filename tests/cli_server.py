"""The warm interpreter behind tests/conftest.py's run_cli: it imports cli.py and the pipeline
once, then forks one child per request, which runs `cli.py ARGS` exactly as a fresh
`python cli.py ARGS` would from there on (its own process, working folder, environment,
stdin from /dev/null, stdout and stderr to the files named, its exit status), without paying
Python's and torch's start-up again (1.5 s a call on the 2-core VM).

    python tests/cli_server.py ROOT

Protocol: one JSON request per line on stdin ({"args", "cwd", "env", "stdout", "stderr"});
for each, two lines on stdout: the child's pid as soon as it is forked (so that the caller
can kill it on a timeout), then its exit code (negative: killed by that signal). EOF on
stdin ends the server. Only the caller (run_cli) talks to it.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import traceback
import warnings


def child(root: str, req: dict) -> int:
    """In the forked child: become `python ROOT/cli.py ARGS` and run it; the exit code."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # the standard streams as a fresh interpreter opens them on files
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        errors="backslashreplace",
        line_buffering=True,
        write_through=unbuffered,
    )
    sys.argv = [os.path.join(root, "cli.py"), *req["args"]]
    import cli

    code = 1
    try:
        try:
            cli.cli()
            code = 0
        except SystemExit as e:  # as the interpreter maps it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def main() -> None:
    root = sys.argv[1]
    sys.path[0] = root  # as for `python cli.py`: the script's folder first
    # what the commands import, once (cli.py itself imports the pipeline lazily)
    import cli  # noqa: F401
    import pipeline.commands.export  # noqa: F401
    import pipeline.commands.runs  # noqa: F401
    import pipeline.commands.segment  # noqa: F401
    import pipeline.stages.extract  # noqa: F401
    import pipeline.stages.predict  # noqa: F401
    import pipeline.stages.train  # noqa: F401

    warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    for line in requests:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                replies.close()
                code = child(root, req)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        replies.write(b"%d\n" % pid)
        _, status = os.waitpid(pid, 0)
        replies.write(b"%d\n" % os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
