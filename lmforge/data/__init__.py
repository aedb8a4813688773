"""Pretraining data: readers/writers, extraction, filters, dedup, pipelines, and token shards."""
