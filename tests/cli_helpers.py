"""Shared test helper: run a verb in-process and check it failed as a user error should."""

from negmargin.cli import main


def one_line_error(capsys, argv):
    """Exit status 2, one line on stderr, no traceback; returns the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err
