"""The job service: runs queued and executed in worker processes (manager.py), and the one list of
errors that are the user's to fix (errors.py)."""

from training.jobs.errors import USER_ERRORS
from training.jobs.manager import JobManager, Limits, OwnershipError

__all__ = ["USER_ERRORS", "JobManager", "Limits", "OwnershipError"]
