"""The evaluator's CPU priority (BATCHLAB_EVALUATOR_NICE): every thread, and the session's
scheduling group only when the process leads its session. Each case runs in a child process,
so the test process keeps its own priority."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.evaluator.server import NICE_ENV, lower_priority

# Starts a thread, applies the setting, starts another; prints every thread's nice (field 19
# of /proc/self/task/<tid>/stat) and the session group's line.
_CHILD = """
import json, sys, threading
from pathlib import Path
from services.evaluator.server import lower_priority
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
applied = lower_priority({"BATCHLAB_EVALUATOR_NICE": sys.argv[1]})
threading.Thread(target=stop.wait, daemon=True).start()
nices = [int(t.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])
         for t in Path("/proc/self/task").iterdir()]
group = Path("/proc/self/autogroup")
print(json.dumps({"applied": applied, "nices": nices,
                  "group": group.read_text().strip() if group.exists() else None}))
"""


def _child(value: str, *, new_session: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, value], check=True, capture_output=True,
                         text=True, start_new_session=new_session, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", ["-1", "20", "nice", "1.5", "\u00b2", "007"])
def test_a_bad_value_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match=NICE_ENV):
        lower_priority({NICE_ENV: value})


def test_unset_or_zero_changes_nothing():
    assert lower_priority({}) == 0
    assert lower_priority({NICE_ENV: "0"}) == 0


def test_a_session_leader_lowers_every_thread_and_its_sessions_group():
    got = _child("7", new_session=True)
    assert got["applied"] == 7
    assert len(got["nices"]) >= 3 and set(got["nices"]) == {7}
    if Path("/proc/self/autogroup").exists():  # a kernel with autogroups (this machine's)
        assert got["group"].endswith("nice 7")


# Leads a session of its own (a stand-in for a person's terminal, so that a regression
# cannot lower the priority of the session running the tests) and starts the child in it.
_SESSION = """
import json, subprocess, sys
from pathlib import Path
group = Path("/proc/self/autogroup")
before = group.read_text().strip() if group.exists() else None
out = subprocess.run([sys.executable, "-c", sys.argv[1], "5"], check=True,
                     capture_output=True, text=True).stdout
after = group.read_text().strip() if group.exists() else None
print(json.dumps({"child": json.loads(out.strip().splitlines()[-1]), "before": before,
                  "after": after}))
"""


def test_a_process_that_does_not_lead_its_session_leaves_the_sessions_group_alone():
    out = subprocess.run([sys.executable, "-c", _SESSION, _CHILD], check=True,
                         capture_output=True, text=True, start_new_session=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(got["child"]["nices"]) == {5}
    # The child shares the session's group, which keeps its priority.
    assert got["child"]["group"] == got["before"] == got["after"]
    if got["before"] is not None:
        assert got["before"].endswith("nice 0")
