"""Both phases in one instance with continuous batching: the baseline disaggregation is measured against."""
