//! Lemurian's worker: executes its rank's share of a plan (the runtime lands with the distributed-runtime issue).
