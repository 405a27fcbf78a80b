"""The measurement lab: does the planner's prediction hold on a real server?

validate runs the check (`python -m planner.validation`): profile the engine, calibrate the
serving overheads, predict attainment with the simulator, then measure it through tritonserver
with the client benchmark; host_cpu models a host whose cores are contended; check_predict
predicts a run; calibration fits the per-step serving overheads. It is the one part of the planner
that drives the real client, so it may import client.bench (the layer contract in pyproject.toml
says so)."""
