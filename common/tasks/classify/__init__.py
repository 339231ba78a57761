"""fedtune.common.tasks.classify.task."""
