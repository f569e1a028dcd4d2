import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
SHARED = REPO.parent / "shared"
XEN_TOOLS = pathlib.Path("/usr/lib/xen-4.17")


@pytest.fixture(scope="session")
def xen_tools():
    """Paths of Xen's own verify-stream-v2 and convert-legacy-stream (xen-utils-4.17).

    Skips where they are absent, except in CI, which installs them and must not skip.
    """
    verify = XEN_TOOLS / "bin" / "verify-stream-v2"
    convert = XEN_TOOLS / "bin" / "convert-legacy-stream"
    if not (verify.exists() and convert.exists()):
        if os.environ.get("XENSTREAM_REQUIRE_INTEROP"):
            pytest.fail("xen-utils-4.17 is required in CI but is not installed")
        pytest.skip("xen-utils-4.17 not installed (apt-get install xen-utils-4.17)")
    env = dict(os.environ, PYTHONPATH=str(XEN_TOOLS / "lib" / "python"))
    return {"verify": str(verify), "convert": str(convert), "env": env}
