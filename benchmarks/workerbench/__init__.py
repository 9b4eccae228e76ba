"""A minimal project the worker benchmarks run: broker, app, two task shapes."""
