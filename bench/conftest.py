import pytest


def pytest_collection_modifyitems(config, items):
    # Every benchmark here runs on the CPU: tag them so `pytest bench -m cpu` selects them.
    for item in items:
        if "bench/test_cpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.cpu)
