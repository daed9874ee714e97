"""A widget job's errors: the user's mistakes become their message, anything else is named a bug."""

from __future__ import annotations

import pytest

from napari_sdunet.errors import InputError
from napari_sdunet.events import Progress
from napari_sdunet.widgets._common import Failure, _guarded, expected_errors


def _run(error: BaseException):
    def job():
        yield Progress("status", 0, 1, message="working")
        raise error

    gen = _guarded(job, (), {})
    p = next(gen)
    assert (p.step, p.total_steps, p.message) == (0, 1, "working")
    with pytest.raises(StopIteration) as stop:
        next(gen)
    return stop.value.value


@pytest.mark.parametrize("error", [InputError("the image is empty"), ValueError("unknown device 'tpu'"),
                                   FileNotFoundError("x.png does not exist")])
def test_user_errors_are_their_message(error):
    result = _run(error)
    assert isinstance(result, Failure) and result.message == str(error)


@pytest.mark.parametrize("error", [RuntimeError("size mismatch in conv"), KeyError("weights"),
                                   TypeError("unsupported operand"), IndexError("out of range")])
def test_other_errors_are_reported_as_bugs(error):
    assert not isinstance(error, expected_errors())
    result = _run(error)
    assert isinstance(result, Failure)
    assert result.message.startswith(f"internal error ({type(error).__name__}") and "bug" in result.message


def test_out_of_memory_is_expected_and_worded():
    result = _run(MemoryError("Unable to allocate 12.0 GiB, out of memory"))
    assert isinstance(result, Failure) and "lower the batch size" in result.message
