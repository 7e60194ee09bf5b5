"""The job service: runs queued and executed in worker processes (manager.py), and the one list of
errors that are the user's to fix (errors.py)."""

from training.jobs.manager import JobManager, Limits, OwnershipError

__all__ = ["JobManager", "Limits", "OwnershipError"]
