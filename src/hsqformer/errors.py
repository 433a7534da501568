"""Errors that the command line reports as one line, without a traceback."""


class HSQformerError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting.

    The CLI prints ``error: <message>`` and exits with status 2; the message must
    name the file, row or field at fault and say what is wrong with it.
    """
