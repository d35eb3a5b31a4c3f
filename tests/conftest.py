import os
from typing import Any

# Integration tests talk to servers on loopback only; a proxy from the environment must not intercept them.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The reliability table (tests/reliability/table.py), when the run's fault tests recorded rows."""
    from tests.reliability.table import lines

    found = lines()
    if found:
        terminalreporter.section("reliability")
        for line in found:
            terminalreporter.write_line(line)
