import time, torch
from spqt.checkpoint import load_spqt
from spqt.default_model import default_spqt
from spqt.generate import Generator
loaded = load_spqt(default_spqt(progress=False))
gen = Generator(loaded, "cuda", max_len=160)
r = gen.generate(list(range(100, 110)), 20, track=False)
print("steps ms", [round(1e3*s, 3) for s in r.step_seconds[:8]])
g = gen._graph
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(50): g.replay()
torch.cuda.synchronize(); print("replay only ms", 1e3*(time.perf_counter()-t)/50)
tok = torch.tensor([5], device="cuda")
torch.cuda.synchronize(); t = time.perf_counter()
for i in range(20): gen.decode_step(tok, 50 + i)
torch.cuda.synchronize(); print("decode_step only ms", 1e3*(time.perf_counter()-t)/20)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for i in range(5): gen.decode_step(tok, 60 + i); torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8))
