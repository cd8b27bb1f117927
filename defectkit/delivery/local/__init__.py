"""The local serving stack, the embedded default backend: model servers on 127.0.0.1 behind a weighted router.

- :mod:`~defectkit.delivery.local.processes`: starting the router and model servers detached, and stopping them by PID;
- :mod:`~defectkit.delivery.local.stack`: the stack file that records them, ``stack_status`` and ``stop_stack``;
- :mod:`~defectkit.delivery.local.scrape`: the servers' ``/metrics`` pages turned into figures per window;
- :mod:`~defectkit.delivery.local.router`: the weighted router, a process of its own
  (``python -m defectkit.delivery.local.router``);
- :mod:`~defectkit.delivery.local.backend`: ``LocalBackend``, the delivery Backend over the stack.

The processes keep serving, at the split the stack had, when the delivery that started
them stops or is killed; ``stop_stack`` ends them.
"""

from __future__ import annotations

from defectkit.delivery.local.backend import LocalBackend, StackOptions
from defectkit.delivery.local.processes import start_model_server, stop_process
from defectkit.delivery.local.stack import read_stack, stack_status, stop_stack

__all__ = ["LocalBackend", "StackOptions", "read_stack", "stack_status", "start_model_server", "stop_process",
           "stop_stack"]
