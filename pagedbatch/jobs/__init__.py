"""The batch job runner: options, the OUT manifest, the job loop, reports."""
from .options import JobOptions, load_job_file
from .runner import JobError, JobResult, run_job

__all__ = ["JobOptions", "load_job_file", "JobError", "JobResult", "run_job"]
