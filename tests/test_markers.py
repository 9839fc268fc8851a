"""The interpreter-only list (tests/interpreter_only.txt) names tests that exist, and marks them."""

import os
import re

from conftest import INTERPRETER_ONLY

HERE = os.path.dirname(__file__)


def test_every_interpreter_only_entry_names_a_test():
    missing = []
    for nodeid in INTERPRETER_ONLY:
        path, name = nodeid.split("::", 1)
        function = re.match(r"[A-Za-z_]\w*", name).group(0)
        source = open(os.path.join(HERE, "..", path)).read()
        if not re.search(rf"^def {function}\(", source, re.M):
            missing.append(nodeid)
    assert not missing, missing
    assert len(INTERPRETER_ONLY) > 100


def test_interpreter_only_tests_are_marked(request):
    """This session's collection marked them (and skips them only where CUDA is)."""
    marked = {item.nodeid for item in request.session.items if item.get_closest_marker("interpreter")}
    collected = {item.nodeid for item in request.session.items}
    assert marked == INTERPRETER_ONLY & collected
