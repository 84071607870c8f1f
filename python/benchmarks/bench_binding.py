#!/usr/bin/python3
"""Times the binding, one thread, float32, at benchmarks/torch_peers.py's shapes:
  module  - loss(x, ...) then .backward() through autograd (what a user runs),
  kernel  - the C++ call alone through the extension (forward_backward + gradient allocation),
  peer    - the same loss in plain PyTorch ops (torch_peers.py), forward + backward.
Reports the minimum over repetitions of the mean per call (a shared machine inflates medians),
module / kernel (the binding's overhead) and peer / module (the speed-up).

    PYTHONPATH=build/test/python-site /usr/bin/python3 python/benchmarks/bench_binding.py [--quick]
(from the repository root, after scripts/test; in its own folder so that python/metricloss,
the sources, does not shadow the installed package)
"""
import argparse
import importlib.util
import pathlib
import time

import torch

import metricloss

REPO = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("torch_peers", REPO / "benchmarks" / "torch_peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


def per_call(fn, min_time, repetitions):
    fn()
    iterations, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
        iterations *= 2
    best = elapsed / iterations
    for _ in range(repetitions - 1):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def cases(quick):
    g = torch.Generator().manual_seed(1)
    uniform = lambda n, d: torch.rand(n, d, generator=g) * 2 - 1
    out = []
    for n in (256,) if quick else (256, 65536):
        a, b = uniform(n, 128), uniform(n, 128)
        sim = (torch.randint(0, 2, (n,), generator=g)).long()
        m = 128 ** 0.5 * 0.8
        loss = metricloss.ContrastiveLoss(margin=m)
        out.append((f"contrastive N={n} D=128", (a, b), lambda t, loss=loss, sim=sim: loss(*t, sim),
                    lambda t, loss=loss, sim=sim: loss._kernel.run(*t, sim, None, None, m, 0, True, True),
                    lambda t, sim=sim, m=m: peers.contrastive(torch, *t, sim != 0, m, False)))
        p = uniform(n, 128)
        loss = metricloss.TripletLoss(margin=0.2)
        out.append((f"triplet (squared) N={n} D=128", (a, b, p), lambda t, loss=loss: loss(*t),
                    lambda t, loss=loss: loss._kernel.run(*t, 0.2, 1, True, True, True),
                    lambda t: peers.triplet_facenet(torch, *t, 0.2)))
    for n in (256,) if quick else (256, 1024, 4096):
        y = peers.pk_labels(torch, n, 8, g)
        x = uniform(n, 128)
        loss = metricloss.BatchTripletLoss(margin=0.2, mining="hard")
        out.append((f"batch hard N={n} D=128", (x,), lambda t, loss=loss, y=y: loss(*t, y),
                    lambda t, loss=loss, y=y: loss._kernel.run(*t, y, 0.2, 1, 0, False, False, True),
                    lambda t, y=y: peers.batch_hard(torch, *t, y, 0.2)))
        for d in (128, 512):
            x = uniform(n, d)
            loss = metricloss.LiftedStructureLoss(margin=1.0)
            out.append((f"lifted N={n} D={d}", (x,), lambda t, loss=loss, y=y: loss(*t, y),
                        lambda t, loss=loss, y=y: loss._kernel.run(*t, y, 1.0, False, True),
                        lambda t, y=y: peers.lifted(torch, *t, y, 1.0)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-time", type=float, default=0.1)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32")
    print(f"{'case':32s} {'module us':>11s} {'kernel us':>11s} {'peer us':>11s} {'mod/kern':>9s} {'peer/mod':>9s}")
    for name, tensors, module_call, kernel_call, peer_call in cases(args.quick):
        inputs = [t.clone().requires_grad_(True) for t in tensors]

        def module_step():
            for t in inputs:
                t.grad = None
            module_call(inputs).backward()

        def peer_step():
            for t in inputs:
                t.grad = None
            peer_call(inputs).backward()

        detached = [t.detach() for t in tensors]
        times = [per_call(f, args.min_time, args.repetitions)
                 for f in (module_step, lambda: kernel_call(detached), peer_step)]
        m, k, p = (t * 1e6 for t in times)
        print(f"{name:32s} {m:11.1f} {k:11.1f} {p:11.1f} {m / k:8.2f}x {p / m:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
