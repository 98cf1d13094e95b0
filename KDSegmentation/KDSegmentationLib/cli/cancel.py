"""SIGINT/SIGTERM as a clean cancellation: an exception in the main thread, so every ``finally`` runs and no
hidden temporary file is left beside an output."""
from __future__ import annotations


class Signalled(KeyboardInterrupt):
    """SIGINT/SIGTERM as an exception. A KeyboardInterrupt, not an Exception, so that no library's broad
    ``except Exception`` turns a cancellation into an ordinary error and carries on."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def install_cancel_handlers():
    """SIGTERM raises :class:`CancelledError` in the main thread (as Ctrl-C raises KeyboardInterrupt), so every
    ``finally`` runs and no hidden temp file is left beside the output. Returns a function restoring the old ones."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    fired = []

    def handler(signum, frame):
        if fired:  # a second signal during the cleanup must not interrupt the cleanup itself
            return
        fired.append(signum)
        raise Signalled(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass

    def restore():
        for sig, previous in old.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, OSError):
                pass
    return restore
