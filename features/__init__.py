"""Features: tokenized (query, ad) pairs, the scenario → task-id map and mixed-scenario batching."""
