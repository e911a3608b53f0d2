"""The research library the stage kinds share: models, providers, data, scoring, statistics."""
