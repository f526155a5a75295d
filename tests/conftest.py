"""Suite-wide settings.

One torch thread: the tiny models spend their time in thread hand-offs rather than maths,
multi-threaded CPU kernels reduce in varying order (bit-exact comparisons need one thread),
and a busy 2-core machine slows a 2-thread run by orders of magnitude.
"""

import contextlib
import logging

import pytest
import torch

from tests.fixtures.fake_webui import FakeWebUI


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lt_caplog(caplog):
    """caplog for the ``lora_trainer`` logger, which does not propagate to the root logger."""
    logger = logging.getLogger("lora_trainer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lora_trainer")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def records():
    """Every record the ``lora_trainer`` logger emits during the test."""
    got: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            got.append(record)

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("lora_trainer")
    logger.addHandler(handler)
    yield got
    logger.removeHandler(handler)


@pytest.fixture
def make_webui(tmp_path):
    """``make(family="sd1", **options)``: a stand-in WebUI of that family, installed (its ``modules``
    importable) until the test ends."""
    with contextlib.ExitStack() as stack:

        def make(family: str = "sd1", **kwargs) -> FakeWebUI:
            fake = FakeWebUI(tmp_path / f"webui-{family}", family, **kwargs)
            stack.enter_context(fake.installed())
            return fake

        yield make
