"""Parsing, pass-through and errors of the CLI, in process (issue 3)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import pytest
import typer
from sampleapp import apps
from taskiq.cli.worker.args import WorkerArgs
from workers import COMMAND, TASKIQ, TESTS_DIR

from taskiq_fastapi_cli.commands import cli
from taskiq_fastapi_cli.commands.plugin import FastAPICMD
from taskiq_fastapi_cli.runtime import args as cli_args
from taskiq_fastapi_cli.runtime.args import FastAPIWorkerArgs


@pytest.fixture
def captured_run(monkeypatch: pytest.MonkeyPatch) -> list[FastAPIWorkerArgs]:
    """Stop at the hand-over to taskiq's runner and keep what it would get."""
    calls: list[FastAPIWorkerArgs] = []

    def fake_run(args: FastAPIWorkerArgs, health: Any = None) -> int:
        calls.append(args)
        if health is not None:
            args.health_server = health  # type: ignore[attr-defined]  # for the tests to see
            health.stop()
        return 0

    import taskiq_fastapi_cli.runtime.runner

    monkeypatch.setattr(taskiq_fastapi_cli.runtime.runner, "run", fake_run)
    monkeypatch.chdir(TESTS_DIR)
    return calls


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), prog_name="taskiq-fastapi")
    out, err = capsys.readouterr()
    return code, out, err


def taskiq_parser_actions() -> list[argparse.Action]:
    """The options of the installed taskiq's own `taskiq worker` parser."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        seen.append(self)
        return original(self, *a, **k)

    argparse.ArgumentParser.parse_args = spy  # type: ignore[method-assign]
    try:
        WorkerArgs.from_cli(["b:b"])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    return [a for a in seen[0]._actions if a.option_strings and a.dest != "help"]


def sample_argv(action: argparse.Action) -> list[str]:
    """A non-default value for one option, built from its definition."""
    flag = action.option_strings[-1]  # the short form where there is one
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, str(list(action.choices)[-1])]
    if action.type in (int, float):
        return [flag, "7"]
    if action.dest == "receiver_arg":
        return [flag, "key=value"]
    if action.dest in ("receiver",):
        return [flag, "taskiq.receiver:Receiver"]
    return [flag, "sample"]


ACTIONS = taskiq_parser_actions()


@pytest.mark.parametrize("action", ACTIONS, ids=[a.dest for a in ACTIONS])
def test_every_taskiq_worker_option_passes_through_unchanged(
    action: argparse.Action,
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    option = sample_argv(action)
    if action.dest == "fs_discover":
        monkeypatch.chdir(tmp_path)  # task modules are imported: find none
    argv = ["sampleapp.queue_broker:broker", "sampleapp.queue_broker", *option]
    expected = WorkerArgs.from_cli(argv)
    code, _, err = run_cli(capsys, "worker", "--app", "sampleapp.apps:app", *argv)
    assert (code, err) == (0, "")
    (got,) = captured_run
    for name, value in vars(expected).items():
        assert getattr(got, name) == value, name
    assert got.app == "sampleapp.apps:app"


def test_our_options_never_shadow_taskiq_ones() -> None:
    taskiq_flags = {flag for a in ACTIONS for flag in a.option_strings}
    # Every option the worker command declares, read from the command itself.
    command = typer.main.get_command(cli.app).commands["worker"]  # type: ignore[attr-defined]
    ours = {
        flag
        for param in command.params
        for flag in [*param.opts, *param.secondary_opts]
        if flag.startswith("-")
    }
    assert {"--app", "--health-port", "--stall-timeout", "--version"} <= ours
    assert taskiq_flags & ours == set()
    assert {"--workers", "-w", "--app-dir", "-d", "--ack-type"} <= taskiq_flags


def test_worker_help_shows_ours_and_every_taskiq_option(capsys: Any) -> None:
    code, out, _ = run_cli(capsys, "worker", "--help")
    assert code == 0
    for flag in [
        "--app", "--factory", "--base-url", "TASKIQ_FASTAPI_APP",
        "--broker-retry-timeout", "TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT",
        "--reload-include", "--reload-exclude",
    ]:  # fmt: skip
        assert flag in out
    lines = out.splitlines()
    assert lines[0] == (
        "Usage: taskiq-fastapi worker [OPTIONS] BROKER [MODULES]... [TASKIQ OPTIONS]"
    )
    arguments = lines.index("Arguments:")
    assert [line.split("  ")[1] for line in lines[arguments + 1 : arguments + 4]] == [
        "BROKER",
        "MODULES",
        "TASKIQ OPTIONS",
    ]
    # Typer's type labels, which mean nothing to a user of these options.
    assert "<bool>" not in out
    assert "<list[str]>" not in out
    for action in ACTIONS:
        for flag in action.option_strings:
            assert flag in out, flag


def test_app_and_base_url_from_environment(
    captured_run: list[FastAPIWorkerArgs], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKIQ_FASTAPI_APP", "sampleapp.apps:app")
    monkeypatch.setenv("TASKIQ_FASTAPI_BASE_URL", "https://example.com/api")
    code, _, err = run_cli(capsys, "worker", "sampleapp.queue_broker:broker")
    assert (code, err) == (0, "")
    assert captured_run[0].app == "sampleapp.apps:app"
    assert captured_run[0].base_url == "https://example.com/api"


def test_without_app_the_broker_modules_init_names_it_and_no_factory_runs_here(
    captured_run: list[FastAPIWorkerArgs], capsys: Any
) -> None:
    code, out, err = run_cli(capsys, "worker", "sampleapp.init_broker:broker")
    assert (code, out, err) == (0, "", "")
    (args,) = captured_run
    assert args.app == ""  # each worker serves what the broker module's init names
    assert apps.events == []  # the factory is the workers' to call, not ours


def test_the_same_app_by_both_ways_is_fine(
    captured_run: list[FastAPIWorkerArgs], capsys: Any
) -> None:
    code, _, err = run_cli(
        capsys,
        "worker", "sampleapp.init_broker:broker",
        "--app", "sampleapp.apps:create_app", "--factory",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert apps.events == []


def test_broker_retry_timeout_default_flag_and_environment(
    captured_run: list[FastAPIWorkerArgs], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["worker", "sampleapp.queue_broker:broker", "--app", "sampleapp.apps:app"]
    assert run_cli(capsys, *argv)[0] == 0
    assert run_cli(capsys, *argv, "--broker-retry-timeout", "2.5")[0] == 0
    monkeypatch.setenv("TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT", "0")
    assert run_cli(capsys, *argv)[0] == 0
    assert [a.broker_retry_timeout for a in captured_run] == [120.0, 2.5, 0.0]


def test_version_names_the_three_packages(capsys: Any) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert out.splitlines() == [
        f"taskiq-fastapi {version('taskiq-fastapi')}",
        f"taskiq {version('taskiq')}",
        f"fastapi {version('fastapi')}",
    ]


# A module path whose package is nowhere: where the command looked for it
# (captured_run runs the command in TESTS_DIR).
LOOKED_HERE = (
    f" Looked in the current directory ({TESTS_DIR}): run it from the "
    "project's directory or pass --app-dir DIR."
)
BAD_INPUTS = [
    (["worker", "sampleapp.bare_broker:broker"], 2,
     "Error: No app to serve: pass --app MODULE:ATTR (or set TASKIQ_FASTAPI_APP), "
     'or call taskiq_fastapi.init(broker, "module:app") in the broker module.'),
    (["worker", "--factory", "sampleapp.init_broker:broker"], 2,
     "Error: --factory needs --app."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.init_broker:broker"], 1,
     "Error: The broker is already initialised with app 'sampleapp.apps:create_app'; "
     "init was called again with app 'sampleapp.apps:app'. A broker serves one "
     "FastAPI app."),
    (["worker", "--app", "sampleapp.apps:app"], 2, "Error: Missing argument 'BROKER'."),
    (["wrkr"], 2, "Error: No such command 'wrkr'. Did you mean 'worker'?"),
    (["worker", "--app", "nowhere.app:app", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'nowhere.app:app': Could not import module \"nowhere.app\"."
     + LOOKED_HERE),
    (["worker", "--app", "sampleapp.apps:missing", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps:missing': "
     "Attribute \"missing\" not found in module \"sampleapp.apps\"."),
    (["worker", "--app", "sampleapp.apps", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps': "
     "Import string \"sampleapp.apps\" must be in format \"<module>:<attribute>\"."),
    (["worker", "--app", "sampleapp.apps:not_an_app", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps:not_an_app': expected a FastAPI app "
     "or a zero-argument factory returning one, got int."),
    (["worker", "--app", "sampleapp.apps:plain_asgi_app", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps:plain_asgi_app': expected a FastAPI app "
     "or a zero-argument factory returning one, got function."),
    (["worker", "--app", "sampleapp.apps:app", "--factory", "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps:app': --factory was given, but it is a "
     "FastAPI app, not a factory returning one."),
    (["worker", "--app", "sampleapp.apps:not_an_app", "--factory",
      "sampleapp.queue_broker:broker"], 1,
     "Error: Cannot load app 'sampleapp.apps:not_an_app': expected a FastAPI app "
     "or a zero-argument factory returning one, got int."),
    (["worker", "--app", "sampleapp.apps:app", "nowhere:broker"], 1,
     "Error: Cannot load broker 'nowhere:broker': Could not import module \"nowhere\"."
     + LOOKED_HERE),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:nope"], 1,
     "Error: Cannot load broker 'sampleapp.queue_broker:nope': "
     "Attribute \"nope\" not found in module \"sampleapp.queue_broker\"."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker"], 1,
     "Error: Cannot load broker 'sampleapp.queue_broker': Import string "
     "\"sampleapp.queue_broker\" must be in format \"<module>:<attribute>\"."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:raising_broker_factory"], 1,
     "Error: Cannot load broker 'sampleapp.queue_broker:raising_broker_factory': the factory "
     "raised RuntimeError: BROKER_URL is not set"),
    # A BaseException from an import was a traceback, here and in check.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.cancelled_import:broker"], 1,
     "Error: Cannot load broker 'sampleapp.cancelled_import:broker': importing it "
     "raised CancelledError"),
    (["check", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "sampleapp.cancelled_import"], 1,
     "Error: Cannot load task module 'sampleapp.cancelled_import': importing it "
     "raised CancelledError"),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:not_a_broker"], 1,
     "Error: Cannot load broker 'sampleapp.queue_broker:not_a_broker': expected a taskiq "
     "broker or a function returning one, got str."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--workers", "many"], 2,
     "Error: argument --workers/-w: invalid int value: 'many'"),
    # taskiq takes any int: 0 workers waited for ever, a negative limit
    # restarted each worker every second before its first task.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--workers", "0"], 2,
     "Error: argument --workers/-w: 0 is below 1: expected 1 or more worker "
     "processes."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "-w", "-1"], 2,
     "Error: argument --workers/-w: -1 is below 1: expected 1 or more worker "
     "processes."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--max-tasks-per-child", "-1"], 2,
     "Error: argument --max-tasks-per-child: -1 is below 0: expected a number "
     "of tasks, or 0 for no limit."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--ack-type", "sometimes"], 2,
     "Error: argument --ack-type: invalid value: 'sometimes'"),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "localhost:8000"], 2,
     "Error: --base-url: Invalid base URL 'localhost:8000': "
     "expected http(s)://host[:port][/root/path]."),
    # urllib's and the idna codec's own words named no value ("Invalid IPv6
    # URL"), and a user:password went into every task's Host header.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "http://[::1:8000"], 2,
     "Error: --base-url: Invalid base URL 'http://[::1:8000': Invalid IPv6 URL."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "http://[api]/"], 2,
     "Error: --base-url: Invalid base URL 'http://[api]/': 'api' does not appear "
     "to be an IPv4 or IPv6 address."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "http://api..example.com"], 2,
     "Error: --base-url: Invalid base URL 'http://api..example.com': "
     "'api..example.com' is not a valid host name."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "https://deploy:s3cret@api.example.com"], 2,
     "Error: --base-url: Invalid base URL 'https://***@api.example.com': "
     "it must not have a user or password (they would be sent as every task's "
     "Host header)."),
    # Masked only after "://" and before the first "/": a password with a
    # "/" in it, or a URL without "//", was printed in full.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "http://deploy:pa/ss@api.example.com"], 2,
     "Error: --base-url: Invalid base URL 'http://***@api.example.com': "
     "its port is not a number from 0 to 65535."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "deploy:s3cret@api.example.com"], 2,
     "Error: --base-url: Invalid base URL '***@api.example.com': "
     "expected http(s)://host[:port][/root/path]."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--base-url", "http:deploy:s3cret@api.example.com"], 2,
     "Error: --base-url: Invalid base URL '***@api.example.com': "
     "expected http(s)://host[:port][/root/path]."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--broker-retry-timeout", "-1"], 2,
     "Error: Invalid value for '--broker-retry-timeout' (env var: "
     "'TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT'): -1 is below 0: expected seconds, "
     "0 or more."),
    # nan: a timeout that never expires; the broker was retried for ever.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--broker-retry-timeout", "nan"], 2,
     "Error: Invalid value for '--broker-retry-timeout' (env var: "
     "'TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT'): nan is not a number: expected "
     "seconds, 0 or more."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--stall-timeout", "NaN"], 2,
     "Error: Invalid value for '--stall-timeout' (env var: "
     "'TASKIQ_FASTAPI_STALL_TIMEOUT'): nan is not a number: expected "
     "seconds, 0 or more."),
    # Beating four times per timeout, an idle worker spun on a tiny one.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--stall-timeout", "0.0001"], 2,
     "Error: Invalid value for '--stall-timeout' (env var: "
     "'TASKIQ_FASTAPI_STALL_TIMEOUT'): 0.0001 is below 0.1: expected "
     "seconds, 0.1 or more, or 0 (off)."),
    # Typer 0.29's own words ("Input should be a valid integer, unable to
    # parse string as an integer") named no value.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--health-port", "abc"], 2,
     "Error: Invalid value for '--health-port' (env var: "
     "'TASKIQ_FASTAPI_HEALTH_PORT'): 'abc' is not a port: expected 1 to 65535."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--health-port", "70000"], 2,
     "Error: Invalid value for '--health-port' (env var: "
     "'TASKIQ_FASTAPI_HEALTH_PORT'): '70000' is not a port: expected 1 to 65535."),
    (["health", "--port", "0"], 2,
     "Error: Invalid value for '--port' (env var: 'TASKIQ_FASTAPI_HEALTH_PORT'): "
     "'0' is not a port: expected 1 to 65535."),
    # Reported as a worker that is not live (exit 1) before.
    (["health", "--port", "9", "--timeout", "0"], 2,
     "Error: Invalid value for '--timeout': 0 is not above 0: expected seconds."),
    (["health", "--port", "9", "--timeout", "-1"], 2,
     "Error: Invalid value for '--timeout': -1 is not above 0: expected seconds."),
    (["health", "--port", "9", "--timeout", "nan"], 2,
     "Error: Invalid value for '--timeout': nan is not above 0: expected seconds."),
    # The socket's timeout overflowed: a traceback.
    (["health", "--port", "9", "--timeout", "1e10"], 2,
     "Error: Invalid value for '--timeout': 1e+10 is above 86400: expected "
     "seconds, a day at most."),
    (["health", "--port", "9", "--timeout", "inf"], 2,
     "Error: Invalid value for '--timeout': inf is above 86400: expected "
     "seconds, a day at most."),
    # taskiq's parser takes them; each worker failed with a traceback as it
    # started (a pool of 0), and was restarted every second for ever.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--max-threadpool-threads", "0"], 2,
     "Error: argument --max-threadpool-threads: 0 is below 1: expected 1 or "
     "more, or leave it out for the default."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--use-process-pool", "--max-process-pool-processes", "-2"], 2,
     "Error: argument --max-process-pool-processes: -2 is below 1: expected 1 "
     "or more, or leave it out for the default."),
    # taskiq 0.11 takes it (a traceback in each worker); later ones refuse it.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--max-prefetch", "-1"], 2,
     re.compile(r"Error: argument --max-prefetch: (max_prefetch cannot be "
                r"negative|-1 is below 0: expected a number of messages, or 0 "
                r"for no prefetch)\.")),
    # nan: a traceback in each worker as it stopped; negative: the app's
    # lifespan never shut down (exit 4), or running tasks were not waited for.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--shutdown-timeout", "nan"], 2,
     "Error: argument --shutdown-timeout: nan is not a number of seconds, 0 or "
     "more."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--shutdown-timeout", "-1"], 2,
     "Error: argument --shutdown-timeout: -1 is not a number of seconds, 0 or "
     "more."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--wait-tasks-timeout", "NaN"], 2,
     "Error: argument --wait-tasks-timeout: nan is not a number of seconds, 0 "
     "or more."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--wait-tasks-timeout", "-0.5"], 2,
     "Error: argument --wait-tasks-timeout: -0.5 is not a number of seconds, 0 "
     "or more."),
    # Typer 0.29's own words ("Input should be a valid number, unable to
    # parse string as a number") named no value.
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--stall-timeout", "abc"], 2,
     "Error: Invalid value for '--stall-timeout' (env var: "
     "'TASKIQ_FASTAPI_STALL_TIMEOUT'): 'abc' is not a number of seconds."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--broker-retry-timeout", "30s"], 2,
     "Error: Invalid value for '--broker-retry-timeout' (env var: "
     "'TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT'): '30s' is not a number of seconds."),
    (["health", "--port", "9", "--timeout", "5s"], 2,
     "Error: Invalid value for '--timeout': '5s' is not a number of seconds."),
    (["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker",
      "--start-method", "clone"], 2,
     # Typer 0.29 adds "Value error, " (pydantic's words); Typer 0.28 does not.
     re.compile(r"Error: Invalid value for '--start-method': (Value error, )?"
                r"'clone' is not one of 'fork', 'spawn', 'forkserver'\.")),
    (["worker", "--app", "sampleapp.apps:failing_app",
      "sampleapp.circular_broker:broker"], 1,
     "Error: The broker is already initialised with app 'sampleapp.circular_app:app'; "
     "init was called again with app 'sampleapp.apps:failing_app'. "
     "A broker serves one FastAPI app."),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "exit_code", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_it(
    argv: list[str],
    exit_code: int,
    message: str | re.Pattern[str],
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (exit_code, "")
    if isinstance(message, re.Pattern):
        assert message.fullmatch(err.rstrip("\n")), err
        assert err.count("\n") == 1
    else:
        assert err == message + "\n"
    assert captured_run == []  # no worker was started


@pytest.mark.parametrize(
    ("variable", "option"),
    [
        ("TASKIQ_FASTAPI_TASK_LOGS", "--task-logs"),
        ("TASKIQ_FASTAPI_LOG_JSON", "--log-json"),
        ("TASKIQ_FASTAPI_METRICS", "--metrics"),
    ],
)
def test_a_bad_switch_in_the_environment_is_one_line_naming_it(
    variable: str,
    option: str,
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Typer 0.29's own words ("Input should be a valid boolean, unable to
    interpret input") named no value; Click's (Typer 0.28) do."""
    monkeypatch.setenv(variable, "maybe")
    argv = ["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker"]
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "")
    said = re.escape(
        f"Error: Invalid value for '{option}' (env var: '{variable}'): 'maybe' is not "
    )
    assert re.fullmatch(
        said + r"(a yes or no: expected 1 or 0\.|a valid boolean\..*)\n", err
    ), err
    assert captured_run == []


@pytest.mark.parametrize(
    ("value", "meant"),
    [("1", True), ("yes", True), (" On ", True), ("TRUE", True), ("0", False),
     ("no", False), ("off", False), ("", False)],
)  # fmt: skip
def test_switches_in_the_environment_read_as_click_reads_them(
    value: str,
    meant: bool,
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKIQ_FASTAPI_TASK_LOGS", value)
    monkeypatch.setenv("TASKIQ_FASTAPI_LOG_JSON", value)
    argv = ["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (captured_run[0].task_logs, captured_run[0].log_json) == (meant, meant)


def test_bad_input_from_the_real_command_has_no_traceback() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [COMMAND, "worker", "--app", "sampleapp.apps:nope", "sampleapp.queue_broker:broker"],
        cwd=TESTS_DIR, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "Error: Cannot load app 'sampleapp.apps:nope': "
        'Attribute "nope" not found in module "sampleapp.apps".\n'
    )
    assert time.monotonic() - started < 10


def test_a_missing_reload_dir_is_one_line_before_anything_starts(
    tmp_path: Path,
) -> None:
    # watchdog's FileNotFoundError was a traceback, after the project's import.
    missing = str(tmp_path / "nope")
    for reload_dir in [missing, "../nope/.."]:
        result = subprocess.run(
            [COMMAND, "worker", "--app", "sampleapp.apps:app",
             "sampleapp.queue_broker:broker", "--reload", "--reload-dir", reload_dir],
            cwd=TESTS_DIR, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            f"Error: --reload-dir {reload_dir!r}: no such directory (from {TESTS_DIR}).\n"
        )


def test_health_without_a_port_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under Typer 0.16 with Click 8.2+, the required option went missing: a
    # traceback (urllib's "nonnumeric port: 'None'").
    monkeypatch.delenv("TASKIQ_FASTAPI_HEALTH_PORT", raising=False)
    for env in [{}, {"TASKIQ_FASTAPI_HEALTH_PORT": ""}]:
        result = subprocess.run(
            [COMMAND, "health"], capture_output=True, text=True, timeout=30,
            env={**os.environ, **env},
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr == (
            "Error: Missing option '--port' (env var: 'TASKIQ_FASTAPI_HEALTH_PORT').\n"
        )


UNSERVABLE = {
    "sampleapp.inmemory:broker": (
        "an InMemoryBroker runs each task in the process that kicks it, so no "
        "worker can listen to it. Give workers a broker with a server "
        "(taskiq-redis, taskiq-nats, ...)."
    ),
    "sampleapp.shared:broker": (
        "taskiq's shared broker only declares shared tasks, so no worker can "
        "listen to it. Give workers the broker the tasks are kicked to (the "
        "one passed to async_shared_broker.default_broker)."
    ),
}


@pytest.mark.parametrize("broker", list(UNSERVABLE))
@pytest.mark.parametrize("command", [[COMMAND], [TASKIQ, "fastapi"]])
def test_a_broker_no_worker_can_listen_to_is_refused_before_any_worker_starts(
    broker: str, command: list[str]
) -> None:
    # Its `listen` raises: taskiq restarted each worker every second, with a
    # traceback each time, for as long as the command ran.
    result = subprocess.run(
        [*command, "worker", "--app", "sampleapp.apps:app", broker, "--workers", "1"],
        cwd=TESTS_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    # One line, from the main process: no worker was started to meet it.
    assert result.stderr.splitlines() == [
        f"Error: Cannot serve broker {broker!r}: {UNSERVABLE[broker]}"
    ]


@pytest.mark.parametrize("broker", list(UNSERVABLE))
def test_check_reports_a_broker_no_worker_can_listen_to(broker: str) -> None:
    """`check` lists what a worker would refuse to start with: this too."""
    refused = f"Cannot serve broker {broker!r}: {UNSERVABLE[broker]}"
    argv = [COMMAND, "check", broker, "--app", "sampleapp.apps:app"]
    text = subprocess.run(
        argv, cwd=TESTS_DIR, capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 1, text.stderr
    assert text.stdout.endswith(f"1 problem:\n- {refused}\n")
    as_json = subprocess.run(
        [*argv, "--json"], cwd=TESTS_DIR, capture_output=True, text=True, timeout=60
    )
    assert as_json.returncode == 1, as_json.stderr
    assert json.loads(as_json.stdout)["problems"] == [refused]


def test_taskiq_lists_the_plugin_and_python_m_works() -> None:
    (entry,) = entry_points(group="taskiq_cli", name="fastapi")
    assert entry.load() is FastAPICMD
    listing = subprocess.run(
        [TASKIQ, "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "fastapi" in listing
    assert FastAPICMD.short_help in " ".join(listing.split())
    for command in ([TASKIQ, "fastapi"], [sys.executable, "-m", "taskiq_fastapi_cli"]):
        result = subprocess.run(
            [*command, "worker", "--app", "x:y"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (result.returncode, result.stderr) == (
            2,
            "Error: Missing argument 'BROKER'.\n",
        )


def test_help_and_version_do_not_import_taskiq_or_fastapi() -> None:
    probe = (
        "import sys; from taskiq_fastapi_cli.commands.cli import main; code = main({argv!r}); "
        "heavy = sorted(m for m in ('taskiq', 'fastapi', 'sampleapp') if m in sys.modules); "
        "print(code, heavy)"
    )
    for argv in (["--help"], ["--version"]):
        result = subprocess.run(
            [sys.executable, "-c", probe.format(argv=argv)],
            capture_output=True, text=True, timeout=30, cwd=TESTS_DIR,
        )  # fmt: skip
        assert result.stdout.splitlines()[-1] == "0 []", result.stdout


def test_reload_without_taskiq_reload_extra_is_a_clear_error(
    captured_run: list[FastAPIWorkerArgs], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "taskiq.cli.watcher", None)  # as if not installed
    argv = ["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker"]
    code, _, err = run_cli(capsys, *argv, "--reload")
    assert (code, err) == (
        1,
        "Error: --reload needs taskiq's reload extra (import of taskiq.cli.watcher "
        "halted; None in sys.modules): pip install 'taskiq-fastapi[reload]'.\n",
    )
    assert captured_run == []


def test_reload_patterns_need_reload(
    captured_run: list[FastAPIWorkerArgs], capsys: Any
) -> None:
    argv = ["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker"]
    code, _, err = run_cli(capsys, *argv, "--reload-include", "*.toml")
    assert (code, err) == (
        2,
        "Error: --reload-include and --reload-exclude need --reload.\n",
    )
    assert captured_run == []


def test_reload_patterns_reach_the_workers(
    captured_run: list[FastAPIWorkerArgs], capsys: Any
) -> None:
    argv = ["worker", "--app", "sampleapp.apps:app", "sampleapp.queue_broker:broker"]
    code, _, _ = run_cli(
        capsys, *argv, "--reload", "--reload-include", "*.toml",
        "--reload-exclude", "*_test.py", "--reload-include", "*.env",
    )  # fmt: skip
    assert code == 0
    assert captured_run[0].reload_includes == ["*.toml", "*.env"]
    assert captured_run[0].reload_excludes == ["*_test.py"]


def test_taskiq_option_help_drops_argparse_usage() -> None:
    text = cli_args.taskiq_options_help()
    assert text.startswith("  --app-dir")
    assert "usage:" not in text
    assert "--max-async-tasks" in text


def real_help(command: str) -> str:
    done = subprocess.run(
        [COMMAND, command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", ["worker", "check", "health"])
def test_help_shows_env_vars_and_defaults_without_rich_escapes(
    capsys: Any, command: str
) -> None:
    # Typer 0.16 with Rich installed printed a backslash before each "[".
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "\\[" not in out
    words = " ".join(out.split())  # as wrapped, "[env" may end a line
    assert "[env var: TASKIQ_FASTAPI_" in words
    assert re.search(r"\[[^]]*default: [^]]+\]", words) or command == "check"


def test_worker_help_has_one_help_option() -> None:
    out = real_help("worker")
    assert len(re.findall(r"^ *-h, --help", out, re.MULTILINE)) == 1
    assert "--workers" in out


def test_check_help_lists_only_the_taskiq_options_check_reads() -> None:
    out = real_help("check")
    assert len(re.findall(r"^ *-h, --help", out, re.MULTILINE)) == 1
    for used in ("--app-dir", "--tasks-pattern", "--fs-discover", "--app", "--json"):
        assert used in out
    for ignored in ("--workers", "--reload", "--ack-type", "--max-async-tasks"):
        assert ignored not in out


def test_app_and_broker_import_from_app_dir(
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    project = tmp_path / "elsewhere"
    (project / "far_pkg").mkdir(parents=True)
    (project / "far_pkg" / "__init__.py").write_text("")
    (project / "far_pkg" / "main.py").write_text(
        "from fastapi import FastAPI\nfrom taskiq_redis import ListQueueBroker\n"
        'app = FastAPI()\nbroker = ListQueueBroker("redis://127.0.0.1:1")\n'
    )
    monkeypatch.chdir(tmp_path)  # not on sys.path by itself
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv = ["worker", "--app", "far_pkg.main:app", "far_pkg.main:broker"]
    code, _, err = run_cli(capsys, *argv)
    assert (code, err) == (
        1,
        "Error: Cannot load broker 'far_pkg.main:broker': "
        f'Could not import module "far_pkg.main". Looked in the current directory '
        f"({tmp_path}): run it from the project's directory or pass --app-dir DIR.\n",
    )
    code, _, err = run_cli(capsys, *argv, "--app-dir", str(project))
    assert (code, err) == (0, "")
    assert captured_run[0].app_dir == str(project)


@pytest.mark.parametrize("command", ["worker", "check"])
def test_version_from_the_commands_too(capsys: Any, command: str) -> None:
    code, out, _ = run_cli(capsys, command, "--version")
    assert code == 0
    assert out.splitlines()[0] == f"taskiq-fastapi {version('taskiq-fastapi')}"


def test_a_misspelled_task_module_is_refused_before_any_worker_starts(
    captured_run: list[FastAPIWorkerArgs], capsys: Any
) -> None:
    code, out, err = run_cli(
        capsys, "worker", "sampleapp.queue_broker:broker", "sampleapp.taskz",
        "--app", "sampleapp.apps:app",
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert err == (
        "Error: Cannot load task module 'sampleapp.taskz': "
        'Could not import module "sampleapp.taskz".\n'
    )
    assert captured_run == []


def test_a_task_module_with_a_syntax_error_is_refused_naming_file_and_line(
    captured_run: list[FastAPIWorkerArgs],
    capsys: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "broken_tasks.py").write_text("def make_receipt(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(
        capsys, "worker", "sampleapp.queue_broker:broker", "broken_tasks",
        "--app", "sampleapp.apps:app",
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert err.startswith(
        "Error: Cannot load task module 'broken_tasks': importing it raised "
        "SyntaxError: "
    )
    assert "(broken_tasks.py, line 1)" in err
    assert err.count("\n") == 1
    assert captured_run == []


def test_task_logs_and_log_json_options(
    captured_run: list[FastAPIWorkerArgs], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off by default; --task-logs shows the fields in taskiq's default format
    unless a --log-format is given; --log-json needs the command's logging."""
    from taskiq_fastapi_cli.runtime.logs import TASK_LOG_FORMAT

    argv = ["worker", "sampleapp.queue_broker:broker", "--app", "sampleapp.apps:app"]
    assert run_cli(capsys, *argv)[0] == 0
    assert run_cli(capsys, *argv, "--task-logs")[0] == 0
    assert run_cli(capsys, *argv, "--task-logs", "--log-format", "%(task_id)s")[0] == 0
    monkeypatch.setenv("TASKIQ_FASTAPI_LOG_JSON", "1")
    assert run_cli(capsys, *argv)[0] == 0
    default = WorkerArgs.log_format
    assert [(a.task_logs, a.log_json, a.log_format) for a in captured_run] == [
        (False, False, default),
        (True, False, TASK_LOG_FORMAT),
        (True, False, "%(task_id)s"),
        (False, True, TASK_LOG_FORMAT),
    ]
    assert run_cli(capsys, *argv, "--log-format", "%(message)s") == (
        2, "", "Error: --log-json and --log-format: give one or the other.\n",
    )  # fmt: skip
    assert run_cli(capsys, *argv, "--no-configure-logging") == (
        2, "",
        "Error: --log-json formats the logging the command configures, which "
        "--no-configure-logging turns off: in your own logging config use "
        "taskiq_fastapi.task_logs.JSONFormatter, with --task-logs.\n",
    )  # fmt: skip
    assert len(captured_run) == 4


def test_a_broker_with_an_unhashable_listen_is_checked_in_one_piece() -> None:
    # Its `listen` was looked up as a dict key: a TypeError traceback, exit 1.
    result = subprocess.run(
        [COMMAND, "check", "sampleapp.unhashable_listen:broker",
         "--app", "sampleapp.apps:app"],
        cwd=TESTS_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "No tasks found: name the task modules after the broker.\n"
