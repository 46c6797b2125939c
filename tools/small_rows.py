"""Products of a few rows by many streamed weight matrices on the CPU: what a verify pass's layer projections
cost per row count (docs/BENCHMARKS.md, issue 36). Sixty 1536 x 576 fp32 matrices, cycled so each is read from
memory as in a decode step; F.linear against mm on a transposed contiguous copy. Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/small_rows.py"""
import torch
import torch.nn.functional as F
from timing import median_ms


def med(fn, n=20, warm=5):
    """Microseconds."""
    return 1e3 * median_ms(fn, n, warm)


torch.manual_seed(0)
H, I = 576, 1536
ws = [torch.randn(I, H) for _ in range(60)]
wts = [w.t().contiguous() for w in ws]
for rows in (1, 2, 5, 9):
    x = torch.randn(rows, H)
    a = med(lambda: [F.linear(x, w) for w in ws]) / len(ws)
    b = med(lambda: [torch.mm(x, wt) for wt in wts]) / len(ws)
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in ws]
    c = med(lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, rows) for p, w in zip(packed, ws)]) / len(ws)
    dnn = [w.to_mkldnn() for w in ws]
    d = med(lambda: [torch._C._nn.mkldnn_linear(x.to_mkldnn(), w) for w in dnn]) / len(ws)

    def rate(us):
        return f"{I * H * 4 / us / 1e3:.1f} GB/s"

    print(f"rows {rows}: F.linear {a:.0f} us ({rate(a)})  mm on W^T {rate(b)}  MKL packed {rate(c)} "
          f"(copy {packed[0].numel() / ws[0].numel():.1f}x the weight)  mkldnn_linear {rate(d)}")
