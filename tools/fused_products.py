"""The products of a decode step of the embedded model's shapes (30 layers: q, k, v, o, gate, up, down; the 49152 x 576
head), as the checkpoint's seven matrices per layer against q/k/v and gate/up fused into one each (random weights,
streamed from memory), at 1 and 5 rows (issue 36, docs/BENCHMARKS.md). Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/fused_products.py"""
import torch, time, statistics
torch.manual_seed(0)
L=30; d=576; kv=192; ff=1536
sep=[[torch.randn(o,i) for o,i in [(d,d),(kv,d),(kv,d),(d,d),(ff,d),(ff,d),(d,ff)]] for _ in range(L)]
fused=[[torch.cat([l[0],l[1],l[2]]), l[3], torch.cat([l[4],l[5]]), l[6]] for l in sep]
head=torch.randn(49152,d)
F=torch.nn.functional
def run(ws, x, xf):
    for l in ws:
        for w in l:
            F.linear(x if w.shape[1]==d else xf, w)
    F.linear(x, head)
for rows in (1,5):
    x=torch.randn(1,rows,d); xf=torch.randn(1,rows,ff)
    res={}
    for rep in range(7):
        for name,ws in (("sep",sep),("fused",fused)):
            t=time.perf_counter(); run(ws,x,xf); res.setdefault(name,[]).append(time.perf_counter()-t)
    for k,v in res.items(): print(rows, k, "%.2f ms"%(1e3*statistics.median(v[2:])), "GB/s %.1f"%(538e6/statistics.median(v[2:])/1e9))
