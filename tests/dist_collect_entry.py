"""`dnd <stage> ...` with a crash hook, for the multi-rank collect test (tests/test_collect_distributed.py).

With COLLECT_KILL_AT=n a rank SIGKILLs itself while its n-th checkpoint is a finished temporary file
not yet renamed into place (the worst moment) — but only once every path in COLLECT_KILL_AFTER
(separated by os.pathsep) exists, so what the killed job leaves does not depend on scheduling.
"""

import os
import signal
import sys
import time

from dnd_scale.cli import main

WAIT_S = 300

kill_at = int(os.environ.get("COLLECT_KILL_AT", "0"))
if kill_at:
    wait_for = [path for path in os.environ.get("COLLECT_KILL_AFTER", "").split(os.pathsep) if path]
    real_replace, written = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".safetensors") and "checkpoints" in str(dst) and not os.path.basename(str(dst)).startswith("resume"):
            written.append(dst)
            if len(written) == kill_at:
                deadline = time.monotonic() + WAIT_S
                while not all(map(os.path.exists, wait_for)) and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace

sys.exit(main())
