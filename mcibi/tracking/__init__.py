"""MLflow tracking: experiments, runs, tags, metrics, datasets and model URIs."""
