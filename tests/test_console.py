"""The CLI's quieting of third-party lines: exactly the known ones, on the loggers that print them."""

import logging
import warnings

import pytest

from forgetless import console, workers


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def loggers():
    """The two loggers, each with a handler of the test's own (DeepSpeed's does not propagate), restored after."""
    recorded = {}
    for name in (console.DEEPSPEED_LOGGER, console.BITSANDBYTES_LOGGER):
        logger = logging.getLogger(name)
        recorded[name] = Recorder()
        logger.addHandler(recorded[name])
        logger.setLevel(logging.WARNING)
    yield recorded
    for name, handler in recorded.items():
        logger = logging.getLogger(name)
        logger.removeHandler(handler)
        logger.filters = [f for f in logger.filters if not isinstance(f, console._DropMessages)]
        logger.setLevel(logging.NOTSET)
    console._quieted = None


def say_everything():
    logging.getLogger(console.DEEPSPEED_LOGGER).warning(
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    logging.getLogger(console.DEEPSPEED_LOGGER).warning("ZeRO stage 3: something a user should read")
    logging.getLogger(console.BITSANDBYTES_LOGGER).warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    warnings.warn("some other deprecation", FutureWarning)


def test_only_the_known_lines_are_dropped(loggers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party_noise()
        console.quiet_third_party_noise()  # twice (a worker after its parent's setting): one filter each
        say_everything()
    assert loggers[console.DEEPSPEED_LOGGER].messages == ["ZeRO stage 3: something a user should read"]
    assert loggers[console.BITSANDBYTES_LOGGER].messages == []
    assert [str(w.message) for w in caught] == ["some other deprecation"]
    assert len(logging.getLogger(console.DEEPSPEED_LOGGER).filters) == 1
    assert workers.parent_logging()[2] is False  # what compare's workers are handed


def test_a_quantized_config_keeps_the_kernel_note(loggers):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        console.quiet_third_party_noise(quantized=True)
        say_everything()
    assert loggers[console.BITSANDBYTES_LOGGER].messages[0].startswith("Failed to load CPU gemm_4bit_forward")
    assert workers.parent_logging()[2] is True


def test_nothing_is_quieted_unless_asked(loggers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        say_everything()
    assert len(loggers[console.DEEPSPEED_LOGGER].messages) == 2 and len(caught) == 2
    assert workers.parent_logging()[2] is None
