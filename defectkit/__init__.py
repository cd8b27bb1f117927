"""defectkit: defect detection from images to a judged model served by KServe."""

__version__ = "0.1.0"
