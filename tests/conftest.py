"""Loads the test support (tests/support.py: TensorFlow, fixtures, helpers) in the processes that run tests only.

With pytest-xdist the controller process runs no test. If it imported TensorFlow, pytest's capture would hold the
native start-up lines TensorFlow writes to the stderr file descriptor (oneDNN, cudart_stub, cuInit) and replay them
when the session ends, after the summary line; the workers' output never reaches the terminal.
"""


def runs_tests(config):
    """False only in an xdist controller: a process started with -n N > 0 that is not itself a worker."""
    return hasattr(config, "workerinput") or not config.getoption("numprocesses", default=0)


def pytest_configure(config):
    if runs_tests(config):
        config.pluginmanager.import_plugin("support")
