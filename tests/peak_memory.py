"""Run a script in this process and report its peak memory, split the way Linux counts it:
RssAnon (private memory: what really has to fit in RAM) and VmRSS (also counts memory-mapped file
pages, which the kernel can drop and re-read). (Not a test; pytest does not collect it.)

    python tests/peak_memory.py convert_hf.py import /tmp/big /tmp/big.pt
"""

import re
import runpy
import sys
import threading
import time

peak = {"RssAnon": 0, "VmRSS": 0}


def _sample():
    while True:
        with open("/proc/self/status") as f:
            status = f.read()
        for key in peak:
            peak[key] = max(peak[key], int(re.search(key + r":\s+(\d+)", status).group(1)))
        time.sleep(0.05)


def main():
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, ".")
    threading.Thread(target=_sample, daemon=True).start()
    t0 = time.time()
    rc = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code or 0
    time.sleep(0.1)
    print(f"[peak_memory] {script}: peak RssAnon {peak['RssAnon'] / 2**20:.2f} GiB, peak VmRSS "
          f"{peak['VmRSS'] / 2**20:.2f} GiB, wall {time.time() - t0:.1f} s, exit {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
