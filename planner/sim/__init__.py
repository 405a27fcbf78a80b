"""The parts of the serving simulator; `planner.simulator` is the entry point and the public API.

- config: what to simulate (Instance, SimConfig);
- events: the event loop (clock and heap);
- ledger: the requests and what happened to them, the busy time of the GPUs;
- router: which instance a request goes to;
- lane: continuous batching of decode steps over pipeline micro-batches (lanes);
- prefill, decode, colocated: one class per instance role."""
