"""Pipeline schedules for dots models: the step-time simulator (`simulator`) of 1F1B,
interleaved 1F1B and the all-to-all-overlapped schedule, and its CLI (`simulate_cli`)."""

from .simulator import SCHEDULES, OpTimes, SimResult, simulate

__all__ = ["SCHEDULES", "OpTimes", "SimResult", "simulate"]
