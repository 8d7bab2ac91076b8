"""Assertions the trust tests share."""

from __future__ import annotations


def one_line_error(capsys, *needles) -> str:
    """The command's last stderr line (after any progress bars of model loading): one `error: ` line holding each
    of ``needles``, and no traceback anywhere on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert err[-1].startswith("error: "), err[-1]
    assert not any(line.startswith("Traceback") for line in err), "\n".join(err)
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]
