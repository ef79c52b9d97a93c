"""Is a step after a pause slow because of the clocks or the caches? Sums over buffers of 1 MiB (in L2), 16 MiB, 92 MiB
(the int4 step's weights) and 1 GiB (DRAM), re-read back to back (steady), right after a 50 ms sleep, and right after
50 ms of compute on 32 KB (a 64 x 64 product, cores busy and memory idle): GB/s of 8 reads each.
    .venv/bin/python results/bench_profile/onecall-scratch/after_idle_sizes.py 2   # threads"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(64, 64), torch.randn(64, 64)


def spin(ms):
    t_end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < t_end:
        torch.mm(a, b)


for mib in (1, 16, 92, 1024):
    buf = torch.ones(mib * 2 ** 20 // 4)
    reps = max(1, 92 // mib) * (4 if mib < 92 else 1)  # a read of ~92 MiB or more a figure

    def read():
        t0 = time.perf_counter()
        for _ in range(reps):
            buf.sum()
        return buf.nbytes * reps / (time.perf_counter() - t0) / 1e9
    for _ in range(20):
        read()
    steady = [read() for _ in range(8)]
    time.sleep(0.05)
    slept = [read() for _ in range(8)]
    spin(50)
    spun = [read() for _ in range(8)]
    f = lambda xs: " ".join(f"{x:5.1f}" for x in xs)  # noqa: E731
    print(f"{mib:5d} MiB x{reps:<3d} GB/s  steady {f(steady)}\n{'':17s}after sleep {f(slept)}\n{'':17s}after spin  {f(spun)}")
