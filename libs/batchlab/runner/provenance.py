"""Which code produced a set of results: the git commit, whether it had local changes, the version.

Results and the reports built from them record this, so a number in docs/results can be traced
to the code that made it, and a report regenerated at another commit says so.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["code_version", "machine_kind", "machine_kind_id"]

log = logging.getLogger(__name__)

COMMIT_ENV = "BATCHLAB_COMMIT"  # set in container images, which carry no .git


@functools.cache
def code_version() -> dict[str, Any]:
    """{"commit": sha or "unknown", "dirty": bool, "version": the distribution's version}.

    The commit comes from BATCHLAB_COMMIT when set, else from git in the checkout this package
    was imported from (an editable install); "dirty" means tracked files differ from the
    commit (untracked files are ignored: result folders and caches live beside the code).
    """
    try:
        version = importlib.metadata.version("batchlab")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "dirty": False, "version": version}
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], check=True, capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.info("no git checkout at %s (%s): commit unknown", root, error)
        return {"commit": "unknown", "dirty": False, "version": version}
    return {"commit": commit, "dirty": bool(status.strip()), "version": version}


# CPU features that change what XLA:CPU generates (vector width, fused multiply-add, ...), and
# so the last bits of a float result: reductions are split differently across wider vectors.
# x86 "flags" and Arm "Features" lines of /proc/cpuinfo.
_ISA_PREFIXES = {"flags": ("sse4", "avx", "fma", "f16c", "amx"),
                 "Features": ("asimd", "sve", "sme", "fphp", "bf16", "i8mm")}


@functools.cache
def machine_kind() -> dict[str, Any]:
    """What "the same machine kind" means in the determinism contract (batchlab.runner.digest).

    The architecture and the CPU features XLA:CPU compiles for: from /proc/cpuinfo where there
    is one (x86 flags, Arm features), else the processor's name (macOS). Two x86-64 CPUs that
    differ in, say, AVX-512 give numbers that differ in the last bits (seen here: the LARS
    update's sums), which training amplifies. Software versions are not part of the kind: a
    new jaxlib that changes numbers is a change of results, which the determinism test must
    catch on a kind it knows.
    """
    isa: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            prefixes = _ISA_PREFIXES.get(key.strip())
            if prefixes is not None:
                isa = sorted({f for f in value.split() if f.startswith(prefixes)})
                break
    except OSError:
        pass
    if not isa:
        brand = ""
        if platform.system() == "Darwin":
            try:
                brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=True,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                brand = ""
        isa = [brand or platform.processor() or "unknown"]
    return {"arch": platform.machine(), "isa": isa}


def machine_kind_id(kind: dict[str, Any] | None = None) -> str:
    """A short stable name of a machine kind (default: this machine's), for file names."""
    kind = machine_kind() if kind is None else kind
    text = json.dumps(kind, sort_keys=True)
    return f"{kind.get('arch', 'unknown')}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
