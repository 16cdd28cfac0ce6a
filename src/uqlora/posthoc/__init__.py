"""Post-hoc predictive tools: the linearised (GLM) Laplace predictive and temperature scaling."""
