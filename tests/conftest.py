"""Shared fixtures live in one module per real component; they start real processes and stop them by handle."""

pytest_plugins = [
    "tests.fixtures_ray",
    "tests.fixtures_s3",
    "tests.fixtures_mlflow",
]
