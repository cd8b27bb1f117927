"""Validation before data is trusted: a raw dataset before training, a production window before drift.

- :mod:`defectkit.validation.dataset`: decode and quarantine a raw image tree, write the dataset artifact, check it.
- :mod:`defectkit.validation.window`: check a window of production samples before the drift monitor uses it.
- :mod:`defectkit.validation.expectations`: the Great Expectations harness both run their checks with.
- :mod:`defectkit.validation.report`: the verdict, failure message, JSON record and HTML page both reports share.
"""
