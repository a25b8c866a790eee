"""batchjob."""
