"""lmforge.training: what every rank does (config, dist, data, model, engine, checkpoint, metrics, evaluate, train)."""
