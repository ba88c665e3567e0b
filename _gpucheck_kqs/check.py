import numpy as np, torch, time
from quantbench.quant import quantize, dequantize
dev = "cuda"
z = np.load("_gpucheck_kqs/ref.npz")
names = sorted({k.split("__")[0] for k in z.files})
bad = 0; n = 0
for name in names:
    x = torch.from_numpy(z[f"{name}__x"]).to(dev); im = torch.from_numpy(z[f"{name}__im"]).to(dev)
    for t in ("Q3_K", "Q6_K", "Q8_K"):
        for mode, qw in (("plain", None), ("imatrix", im)):
            q = quantize(x, t, qw)
            ours = q.data.cpu().numpy(); ref = z[f"{name}__{t}__{mode}"]
            n += 1
            if not np.array_equal(ours, ref):
                bad += 1; print("MISMATCH", name, t, mode, np.nonzero((ours != ref).any(1))[0], flush=True)
            dq_gpu = dequantize(q).cpu().numpy()
            qc = quantize(x.cpu(), t, None if qw is None else qw.cpu())
            if not np.array_equal(dq_gpu, dequantize(qc).numpy()):
                print("DEQUANT differs", name, t, mode)
print(f"checked {n}, mismatches {bad}", flush=True)
torch.manual_seed(0)
X = torch.randn(4096, 4096, device=dev); IM = torch.rand(4096, device=dev) * 10
for t in ("Q3_K", "Q6_K", "Q8_K"):
    for qw in (None, IM):
        quantize(X[:256], t, qw); torch.cuda.synchronize()
        t0 = time.perf_counter(); quantize(X, t, qw); torch.cuda.synchronize()
        print(t, "imatrix" if qw is not None else "plain", f"{time.perf_counter()-t0:.2f}s", flush=True)
