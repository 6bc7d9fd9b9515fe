"""``NamedThread``: the OS sees a server thread's name (``top -H``, ``/proc``)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from service.threads import NamedThread, os_thread_name


def test_the_os_name_is_cut_to_15_bytes_without_splitting_a_character() -> None:
    assert os_thread_name("textgen-engine") == b"textgen-engine"
    assert os_thread_name("textgen-engine-wake") == b"textgen-engine-"
    assert (
        os_thread_name("textgen-\u00e9\u00e9\u00e9\u00e9") == "textgen-\u00e9\u00e9\u00e9".encode()
    )  # 14 bytes, not 15
    assert len(os_thread_name("x" * 40)) == 15


def _own_os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_a_named_thread_shows_its_name_to_the_os() -> None:
    seen: dict[str, str] = {}
    for key, thread_type in (("named", NamedThread), ("plain", threading.Thread)):
        thread = thread_type(target=lambda key=key: seen.update({key: _own_os_name()}), name="textgen-test-thread")
        thread.start()
        thread.join()
    assert seen["named"] == "textgen-test-th"
    assert seen["plain"] != "textgen-test-th"  # a plain thread keeps the process's name
