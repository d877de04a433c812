"""Shared test plumbing. Fixtures of each area live in tests/support/.

Every JSON response that t2i's own handlers send during the run is checked
against the OpenAPI document of the server that sent it (t2i/openapi.yaml, cut
to that server's operations); a mismatch fails the run. When the whole suite
runs, every (method, path, status) each server's document promises must also
have been produced by that server in some test.
"""

import json
import sys
from pathlib import Path

import pytest
from tornado import web

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from t2i import openapi  # noqa: E402

SEEN: set[tuple[str | None, str, str, int]] = set()  # (server, method, path template, status)
PROBLEMS: list[str] = []

_original_finish = web.RequestHandler.finish


def _recording_finish(self, chunk=None):
    module = type(self).__module__
    if module.startswith("t2i.") and not module.startswith("t2i.comfy_sim"):
        _record(self, chunk)
    return _original_finish(self, chunk)


def _record(handler, chunk):
    request = handler.request
    server = openapi.server_of(handler.application)  # None: an app without /openapi.json (both documents)
    template = openapi.match_path(request.path, server)
    stream = getattr(request.connection, "stream", None)
    if template is None or (stream is not None and stream.closed()):
        return  # nothing reaches a client that hung up (an abandoned long-poll finishes empty)
    status = handler.get_status()
    SEEN.add((server, request.method, template, status))
    body = None
    is_json = "json" in (handler._headers.get("Content-Type") or "")
    if openapi.expects_json(request.method, request.path, status, server) and (not is_json or not chunk):
        PROBLEMS.append(f"{request.method} {template} {status}: documented as JSON, sent "
                        f"{handler._headers.get('Content-Type')!r} with {'a' if chunk else 'no'} body "
                        f"(in {request.uri})")
        return
    if is_json:
        try:
            if isinstance(chunk, dict):
                body = chunk
            elif chunk:
                body = json.loads(chunk)
        except ValueError:
            PROBLEMS.append(f"{request.method} {request.path} {status}: body is not JSON")
            return
    for problem in openapi.check_response(request.method, request.path, status, body, server):
        PROBLEMS.append(f"{problem} (in {request.uri})")


web.RequestHandler.finish = _recording_finish


@pytest.fixture(autouse=True)
def _responses_match_the_openapi_document():
    """Fail the test that made a response the document does not describe, not only the session."""
    before = len(PROBLEMS)
    yield
    new = PROBLEMS[before:]
    assert not new, "responses that do not match t2i/openapi.yaml:\n" + "\n".join(new)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    if PROBLEMS:
        write(f"\nOpenAPI: {len(PROBLEMS)} responses do not match t2i/openapi.yaml:")
        for problem in sorted(set(PROBLEMS))[:50]:
            write(f"  {problem}")
        session.exitstatus = 1
    args = [str(Path(arg).resolve()) for arg in session.config.args]
    whole_suite = not session.config.option.keyword and args in ([], [str(TESTS)])
    if whole_suite and session.testscollected and not session.shouldfail:
        missing = sorted((server, *response) for server in openapi.SERVERS
                         for response in openapi.documented_responses(server)
                         if (server, *response) not in SEEN)
        if missing:
            write(f"\nOpenAPI: {len(missing)} documented responses were produced by no test:")
            for server, method, path, status in missing:
                write(f"  {server}: {method} {path} {status}")
            session.exitstatus = 1
