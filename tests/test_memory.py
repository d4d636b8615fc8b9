"""The cycle collector leaves the imports' objects alone, and still collects what comes after."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from serving.tools.launch import LaunchedServer

# In a fresh interpreter: the test process's own objects (pytest's, other tests') would count too.
PROBE = """
import gc, json, weakref
import serving.server  # what `convserve serve` imports before it calls freeze_imports
from serving.memory import freeze_imports

before = len(gc.get_objects())
freeze_imports()

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the collector frees it
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()),
                  "cycle_freed": gone() is None}))
"""


def test_freeze_imports_takes_the_imports_out_of_full_collections_and_later_cycles_still_go() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["frozen"] >= 0.9 * counts["before"] > 10_000  # grpc, onnxruntime, numpy, protobuf
    assert counts["walked"] < 0.05 * counts["frozen"]  # what a full pass still walks
    assert counts["cycle_freed"]


def test_the_server_leaves_its_imports_out_of_the_cycle_collector(digits_server: LaunchedServer) -> None:
    """`run_server` freezes before it loads a model; the server says how many objects it left out."""
    found = re.search(r"(\d+) objects of the imports left out of the cycle collector", digits_server.log())
    assert found is not None, digits_server.log()[-2000:]
    assert int(found.group(1)) > 10_000
