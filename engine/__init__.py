"""Paged-KV LLaMA-family engine with separate prefill and decode entry points."""
