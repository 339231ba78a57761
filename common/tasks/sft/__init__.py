"""fedtune.common.tasks.sft.task."""
