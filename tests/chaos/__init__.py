"""Fault scenarios against the real local stack: ``make chaos`` (``python -m tests.chaos``).

Each scenario module under this package exposes ``SCENARIOS``, a tuple of
:class:`tests.chaos.harness.Scenario`; the runner runs them, prints one table
and exits non-zero when any outcome misses its goal.
"""
