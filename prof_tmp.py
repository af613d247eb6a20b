import sys, torch
sys.path.insert(0, "benchmarks")
import harness
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
for case in harness.collect(True, dev, sys.argv[1:] or None):
    try:
        fn = case.build()["genfast"]
        for _ in range(5): fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(10): fn()
            torch.cuda.synchronize()
        print("#####", case.label, flush=True)
        print(p.key_averages().table(sort_by="device_time_total", row_limit=7, max_name_column_width=60), flush=True)
    except Exception as e:
        print("#####", case.label, "FAILED", repr(e)[:300], flush=True)
