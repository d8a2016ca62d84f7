"""What the API and the workers share: settings, the job store, the Celery app configuration,
the webhook net guard and the retention policy. Light: no torch, no worker imports."""
