"""The Celery worker process: the job task, recovery and retention sweeps, webhook dispatch."""
