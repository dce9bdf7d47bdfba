"""A user score_mod whose module kills the compile worker that imports it (as a compiler crash
would); anywhere else it is the identity score_mod."""

import os
import signal

if os.environ.get("FLEXBENCH_COMPILE_WORKER"):
    os.kill(os.getpid(), signal.SIGKILL)


def plain(score, b, h, q_idx, kv_idx):
    return score
