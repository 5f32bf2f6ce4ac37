"""`python -m tests.fault_server serve ...`: the real `rankserve serve`, with a device fault injected into
the engine's generate step, chosen by RANKSERVE_TEST_FAULT:

- ``crash:N``: the (N+1)th model step raises, as a CUDA error or an OOM inside a kernel would;
- ``hang:N``: the (N+1)th model step never returns (sleeps for an hour), as a wedged device would.

Only the fault tests start it; the production entry point has no fault hooks.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from server.cli import main
from server.engine import Engine


def inject(spec: str) -> None:
    kind, _, after = spec.partition(":")
    if kind not in ("crash", "hang"):
        raise SystemExit(f"RANKSERVE_TEST_FAULT={spec!r}: expected crash:N or hang:N")
    healthy_steps = int(after or 0)
    step = Engine._step
    count = [0]
    lock = threading.Lock()

    def faulty(self, chunks):
        with lock:
            count[0] += 1
            n = count[0]
        if n > healthy_steps:
            if kind == "crash":
                raise RuntimeError("injected device fault (RANKSERVE_TEST_FAULT)")
            time.sleep(3600)
        return step(self, chunks)

    Engine._step = faulty


if __name__ == "__main__":
    inject(os.environ["RANKSERVE_TEST_FAULT"])
    sys.exit(main())
