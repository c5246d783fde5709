"""Where a CIFAR training step of aft_conv_tiny_stem4_32 spends its time on the GPU (eager, bf16 autocast).

Times forward, forward + backward and the AdamW step on random 32 px batches of 512 and 2048 for aft_conv_tiny_stem4_32
and DeiT-tiny with 4 px patches (the same 64 tokens), sums the GPU kernels' time over three profiled steps (below the
step's wall time: the GPU waits for Python to launch kernels), and times ``--device-data``'s augmentation of a batch.
Ran once in a lease (output: results/cifar10/gpu-lease/step_probe.log), with the carried timm wheel:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site timm-1.0.31-py3-none-any.whl
    PYTHONPATH=/tmp/site:. python3 recipes/cifar10/gpu_step_probe.py
"""
import sys, time, torch, timm
sys.path.insert(0, '.')
import aft_vit  # noqa
from aft_vit.device_data import DeviceResidentLoader
from timm.optim import create_optimizer_v2
dev = 'cuda'
print(torch.__version__, torch.cuda.get_device_name())

def timed(fn, n):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n

for name in ('aft_conv_tiny_stem4_32', 'vit_tiny_patch16_224'):
    kw = dict(img_size=32, patch_size=4) if name.startswith('vit') else {}
    for batch in (512, 2048):
        m = timm.create_model(name, num_classes=10, drop_path_rate=0.1, **kw).to(dev).train()
        opt = create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05)
        x = torch.randn(batch, 3, 32, 32, device=dev); y = torch.randint(0, 10, (batch,), device=dev)
        def fwd():
            with torch.no_grad(), torch.autocast('cuda', torch.bfloat16): m(x)
        def fwdbwd():
            with torch.autocast('cuda', torch.bfloat16): loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
        def step():
            opt.zero_grad(set_to_none=True); fwdbwd(); opt.step()
        t_f, t_fb, t_s = timed(fwd, 10), timed(fwdbwd, 10), timed(step, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3): step()
            torch.cuda.synchronize()
        gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total) / 3
        kernels = sum(e.count for e in prof.key_averages() if e.device_time_total) / 3
        print(f'{name} b{batch}: step {t_s*1e3:.1f} ms ({batch/t_s:.0f} img/s), fwd+bwd {t_fb*1e3:.1f}, '
              f'fwd {t_f*1e3:.1f} ms; GPU busy ~{gpu_us/1e3:.1f} ms/step in ~{kernels:.0f} kernel calls', flush=True)
        if batch == 512 and name.startswith('aft'):
            print(prof.key_averages().table(sort_by='device_time_total', row_limit=12), flush=True)
images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, device=dev)
loader = DeviceResidentLoader(images, torch.zeros(50000, dtype=torch.long), 512, (32, 32), (0.5,) * 3, (0.25,) * 3,
                              scale=(0.35, 1), interpolation='bicubic')
batch = images[:512]
print(f'augment b512: {timed(lambda: loader.augment(batch), 20)*1e3:.2f} ms', flush=True)
