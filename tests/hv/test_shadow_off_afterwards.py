"""The save engines' shared cleanup: log-dirty off however the save ends, never hiding the first error."""

import pytest

from xenstream.hv.guestview import shadow_off_afterwards


class _Hv:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def shadow_off(self, domid: int) -> None:
        self.calls.append(domid)
        if self.fail:
            raise RuntimeError("shadow op refused")


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict]] = []

    def warning(self, message: str, **fields) -> None:
        self.warnings.append((message, fields))


def _save(hv, log, body):
    with shadow_off_afterwards(hv, 7, log, "shadow off failed during test cleanup"):
        return body()


def test_switches_off_after_success_and_passes_the_result_through():
    hv, log = _Hv(), _Log()
    assert _save(hv, log, lambda: "result") == "result"
    assert hv.calls == [7]
    assert log.warnings == []


def test_switches_off_after_failure_and_keeps_the_first_error():
    hv, log = _Hv(), _Log()

    def body():
        raise ValueError("the save failed")

    with pytest.raises(ValueError, match="the save failed"):
        _save(hv, log, body)
    assert hv.calls == [7]


def test_a_failed_switch_off_is_logged_not_raised():
    hv, log = _Hv(fail=True), _Log()

    def body():
        raise ValueError("the save failed")

    with pytest.raises(ValueError, match="the save failed"):
        _save(hv, log, body)
    assert _save(hv, log, lambda: 3) == 3
    assert log.warnings == [("shadow off failed during test cleanup", {"domid": 7, "error": "shadow op refused"})] * 2
