"""Set-up of long-lived decode workers (imported in worker processes: no torch here)."""

from __future__ import annotations

import os
import signal
import threading
import time

#: How often a worker checks that the process it works for is still alive.
PARENT_CHECK_S = 1.0


def guard_decode_worker(owner_pid: int) -> None:
    """Initializer for every decode worker (batch, watch, serve-scp, training tools).

    - SIGINT and SIGTERM are blocked: a Ctrl-C on the terminal reaches the whole
      process group, and the main process, not the workers, decides how to stop (it
      finishes the files in flight, then closes the pool, which ends the workers).
    - The worker exits when ``owner_pid`` is gone: a SIGKILLed watcher cannot tell its
      workers, which would otherwise wait forever on their task queue (their parent
      is the forkserver, so a parent-death signal would not fire either).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])

    def watch_owner() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # it exists, under another user (pid reuse is not worth handling here)

    threading.Thread(target=watch_owner, name="owner-watch", daemon=True).start()
