"""A running exchange (the role's nginx.conf and token.conf under the real nginx) per module."""

from __future__ import annotations

import pytest
from exchange_helpers import MAX_BODY, NGINX, make_token, prepare, start, stop


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    if not NGINX:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    ex = start(prepare(tmp_path_factory.mktemp("exchange"), "127.0.0.1", make_token(), MAX_BODY))
    yield ex
    stop(ex)
