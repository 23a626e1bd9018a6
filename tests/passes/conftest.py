import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # each test compiles its own models: start from empty Dynamo caches so that one test's compiled code
    # (or a float Dynamo made dynamic after seeing two values) never leaks into the next
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
