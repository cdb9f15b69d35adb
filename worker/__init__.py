"""ICH Watch workers: `celery -A worker worker -Q ich.score -P solo` scores slices;
`celery -A worker worker -Q alerts -P threads` delivers alerts and sends study summaries.

Celery finds the app in `worker/celery.py` (its documented layout), so importing this package
reads no settings and imports neither Celery's app nor TensorFlow."""
