"""What a run reads and writes on disk: Orbax checkpoints (``checkpoint``) and the metric
writers (``writers``: ``metrics.jsonl``, TensorBoard, the progress bar)."""
