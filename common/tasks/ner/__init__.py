"""fedtune.common.tasks.ner.task."""
