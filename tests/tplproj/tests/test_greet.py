"""The project's own test, as its authors wrote it for taskiq-fastapi 0.5."""

from fastapi.testclient import TestClient

import taskiq_fastapi
from tplproj.tasks import greet
from tplproj.tkq import broker
from tplproj.web.application import get_app


def test_greet_runs_with_the_apps_request() -> None:
    app = get_app()
    taskiq_fastapi.populate_dependency_context(broker, app)
    with TestClient(app) as client:

        async def kick() -> object:
            task = await greet.kiq("ada")
            return (await task.wait_result(timeout=5)).return_value

        result = client.portal.call(kick)
    assert isinstance(result, dict)
    assert result["text"] == "hello, ada"
    assert result["link"] == "http://localhost:8000/health"
