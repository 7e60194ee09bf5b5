"""The job service: runs queued and executed in worker processes (manager.py). The errors that are
the user's to fix are listed in training/core/errors.py."""

from training.jobs.manager import JobManager, Limits

__all__ = ["JobManager", "Limits"]
