"""Delivery: ship a candidate model through a canary, then promote or roll back.

controller (``defectkit deploy``), analysis, state, record; backends: local (with router) and kserve.
"""
