"""The workers' broker with taskiq's own PrometheusMiddleware, as 0.5 projects had."""

import os
import tempfile
from pathlib import Path

from taskiq.middlewares.prometheus_middleware import PrometheusMiddleware

from workerapp.broker import broker

broker.add_middlewares(
    PrometheusMiddleware(
        metrics_path=Path(tempfile.gettempdir()) / "taskiq-own",
        server_port=int(os.environ["TASKIQ_PROMETHEUS_PORT"]),
        server_addr="127.0.0.1",
    )
)
