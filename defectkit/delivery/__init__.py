"""Delivery: ship a candidate model through a canary, then promote or roll back.

controller (the canary state machine) and rollout (its wiring: ``defectkit rollout``), analysis, state, record;
backends: local/ (model servers behind a weighted router on 127.0.0.1) and kserve.
"""
