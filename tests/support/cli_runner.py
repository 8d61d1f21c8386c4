"""Running the `isthmus` command in-process and checking its one-line errors (shared by tests/)."""

from __future__ import annotations

from isthmus.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `isthmus ARGS...`."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    """A user mistake: exit status 2 and one line on stderr containing each needle, no traceback."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
