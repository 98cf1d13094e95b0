"""User-facing errors.

Anything raised as :class:`InputError` is reported by the command line as one line on stderr (and as an
``{"event": "error"}`` JSON line with ``--progress json``) with exit code 2 and no traceback.
"""


class InputError(Exception):
    """Bad input from the user: missing/corrupt file, wrong modality, bad option value, tampered model...

    The message must say what is wrong and what to do about it, in one line.
    """


class CancelledError(Exception):
    """The run was cancelled (SIGINT/SIGTERM or a cancel request); partial work has been discarded or checkpointed."""
