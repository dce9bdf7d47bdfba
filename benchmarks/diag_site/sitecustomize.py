"""sweep_diag_gpu.py's hooks inside the processes `flexbench run` starts (benchmark code only).

Python imports this at start-up when benchmarks/diag_site is on PYTHONPATH. It does nothing
unless FLEXBENCH_DIAG_SITE holds a JSON spec and this process is flexbench's measuring process
(`-m flexbench.measuring`) or a compile worker (`-m flexbench.precompile`). Then it installs
sweep_diag_gpu's lazy hooks (`Hooks.install_lazy`: nothing imported early) and appends every
event to PREFIX.<role>.<pid>.jsonl at once (a worker is killed, not exited).
"""

from __future__ import annotations

import json
import os
import sys

ROLES = {"flexbench.measuring": "measuring", "flexbench.precompile": "worker"}


def _role() -> str | None:
    argv = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] in ROLES:
            return ROLES[argv[i + 1]]
    return None


def _install(spec: dict, role: str) -> None:
    sys.path.insert(0, spec["benchmarks"])
    from sweep_diag_gpu import Hooks

    path = f"{spec['prefix']}.{role}.{os.getpid()}.jsonl"

    class Sink(list):
        def append(self, event: dict) -> None:
            super().append(event)
            with open(path, "a") as f:
                f.write(json.dumps({**event, "process": role, "pid": os.getpid()}) + "\n")

    hooks = Hooks(spec["t_spawn"])
    hooks.events = Sink()
    hooks.mark("python started")
    hooks.install_lazy(spec.get("patches"), bool(spec.get("guard_sleep")))


_SPEC = os.environ.get("FLEXBENCH_DIAG_SITE")
_ROLE = _role() if _SPEC else None
if _ROLE is not None:
    _install(json.loads(_SPEC), _ROLE)
