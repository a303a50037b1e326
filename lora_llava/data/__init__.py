"""The data pipeline: dataset files -> samples -> template -> tokens and labels -> batches."""
