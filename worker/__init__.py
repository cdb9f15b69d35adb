"""ICH Watch workers: `celery -A worker worker -Q ich.score -P solo` scores slices;
`celery -A worker worker -Q alerts -P threads` delivers alerts and sends study summaries.
TensorFlow is imported only by a process that scores."""
from worker.app import app

__all__ = ["app"]
