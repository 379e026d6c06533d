"""Training one model: the Composer model, its metrics, loggers, checkpointing, schedules, signals, warm starts,
exports and the Trainer assembled from them. Imports slm.core, slm.cluster, slm.data and slm.hub."""
