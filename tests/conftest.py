"""Shared test plumbing. Fixtures of each area live in tests/support/.

Every JSON response that t2i's own handlers send during the run is checked
against the OpenAPI document (t2i/openapi.yaml); a mismatch fails the run.
When the whole suite runs, every documented (method, path, status) must also
have been produced by some test.
"""

import json
import sys
from pathlib import Path

from tornado import web

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from t2i import openapi  # noqa: E402

SEEN: set[tuple[str, str, int]] = set()
PROBLEMS: list[str] = []

_original_finish = web.RequestHandler.finish


def _recording_finish(self, chunk=None):
    module = type(self).__module__
    if module.startswith("t2i.") and not module.startswith("t2i.comfy_sim"):
        _record(self, chunk)
    return _original_finish(self, chunk)


def _record(handler, chunk):
    request = handler.request
    template = openapi.match_path(request.path)
    if template is None:
        return
    status = handler.get_status()
    SEEN.add((request.method, template, status))
    body = None
    if "json" in (handler._headers.get("Content-Type") or ""):
        try:
            if isinstance(chunk, dict):
                body = chunk
            elif chunk:
                body = json.loads(chunk)
        except ValueError:
            PROBLEMS.append(f"{request.method} {request.path} {status}: body is not JSON")
            return
    for problem in openapi.check_response(request.method, request.path, status, body):
        PROBLEMS.append(f"{problem} (in {request.uri})")


web.RequestHandler.finish = _recording_finish


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    if PROBLEMS:
        write(f"\nOpenAPI: {len(PROBLEMS)} responses do not match t2i/openapi.yaml:")
        for problem in sorted(set(PROBLEMS))[:50]:
            write(f"  {problem}")
        session.exitstatus = 1
    whole_suite = not session.config.option.keyword and session.config.args in ([], ["tests"], [str(TESTS)])
    if whole_suite and session.testscollected and not session.shouldfail:
        missing = sorted(openapi.documented_responses() - SEEN)
        if missing:
            write(f"\nOpenAPI: {len(missing)} documented responses were produced by no test:")
            for method, path, status in missing:
                write(f"  {method} {path} {status}")
            session.exitstatus = 1
