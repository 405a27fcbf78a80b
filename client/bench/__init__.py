"""Goodput benchmark: open-loop streaming load, TTFT/TPOT/latency, joint SLO attainment, goodput,
and the disaggregated-vs-colocated comparison (`python -m client.bench [compare] ...`)."""
