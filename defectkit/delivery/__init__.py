"""Delivery: ship a candidate model through a canary, then promote or roll back."""
