"""The scheduled job on top of the stages: ``python -m job.run`` (see job.run)."""
