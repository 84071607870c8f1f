"""metricloss.distributed: 3 gloo processes on loopback, each with its shard of a global batch,
against one process on the whole batch (float64): every loss, mode and option of the batch
losses; shards {7, 0, 11}, {6, 6, 6}, {18, 0, 0}. Every rank's loss within 1e-12 of the
single-process loss and bitwise the same on all ranks (and on a second call); each rank's
gradient rows within 1e-12 of the single-process gradient's rows; a malformed call on one
rank raises the same ValueError, naming that rank, on every rank. With a reference set (the
same on every rank): L, each rank's rows of grad_q and all of grad_r within 1e-12 of one
process's, L and grad_r bitwise the same on every rank."""
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import metricloss
import metricloss.distributed

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no gloo backend")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(shards, tmp_path, timeout=240):
    world = len(shards)
    port = free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(r),
                               str(world), str(port), ",".join(map(str, shards)), str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r] if r < len(logs) else ''}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("shards", [[7, 0, 11], [6, 6, 6], [18, 0, 0]])
def test_three_gloo_processes_equal_one_process(shards, tmp_path):
    ranks = run_ranks(shards, tmp_path)
    x, labels = worker.global_batch(sum(shards))
    assert ranks[0]["repr"] == "metricloss.distributed.group(rank=0, size=3)"
    cases = worker.cases()
    assert len(ranks[0]["results"]) == 2 * len(cases)  # the batch and the reference-set cases
    largest = 0.0
    for name, loss_fn in cases:
        xs = x.clone().requires_grad_()
        expected = loss_fn(xs, labels)
        expected.backward()
        first = 0
        for r, rank in enumerate(ranks):
            value, second, grad = rank["results"][name]
            assert abs(value - expected.item()) <= 1e-12 * (1 + abs(expected.item())), (name, r)
            assert value == ranks[0]["results"][name][0], (name, r)  # bitwise across ranks
            assert second == value, (name, r)
            rows = xs.grad[first:first + shards[r]]
            assert grad.shape == rows.shape, (name, r)
            gap = (grad - rows).abs().max().item() if rows.numel() else 0.0
            assert gap <= 1e-12 * (1 + rows.abs().max().item() if rows.numel() else 1), (name, r, gap)
            first += shards[r]
        largest = max(largest, xs.grad.abs().max().item())
    assert largest > 1e-3  # the cases have gradients: zeros everywhere would pass the above


@pytest.mark.parametrize("shards", [[7, 0, 11], [6, 6, 6], [18, 0, 0]])
def test_reference_sets_over_three_gloo_processes_equal_one_process(shards, tmp_path):
    """Queries sharded, R the same on every rank: L within 1e-12 of one process's and bitwise
    the same on every rank, each rank's rows of grad_q and all of grad_r within 1e-12, grad_r
    bitwise the same on every rank."""
    ranks = run_ranks(shards, tmp_path)
    x, labels = worker.global_batch(sum(shards))
    r, r_labels, self_index = worker.reference_set(x, labels)
    largest = 0.0
    for name, loss_fn in worker.cases():
        q = x.clone().requires_grad_()
        ref = r.clone().requires_grad_()
        expected = loss_fn(q, labels, ref=ref, ref_labels=r_labels, self_index=self_index)
        expected.backward()
        grad_r_expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        scale = 1 + max(q.grad.abs().max().item(), grad_r_expected.abs().max().item())
        first = 0
        for k, rank in enumerate(ranks):
            value, _, grad_q, grad_r = rank["results"]["reference " + name]
            assert abs(value - expected.item()) <= 1e-12 * (1 + abs(expected.item())), (name, k)
            assert value == ranks[0]["results"]["reference " + name][0], (name, k)
            rows = q.grad[first:first + shards[k]]
            assert grad_q.shape == rows.shape, (name, k)
            if rows.numel():
                assert (grad_q - rows).abs().max().item() <= 1e-12 * scale, (name, k)
            assert (grad_r - grad_r_expected).abs().max().item() <= 1e-12 * scale, (name, k)
            assert torch.equal(grad_r, ranks[0]["results"]["reference " + name][3]), (name, k)
            first += shards[k]
        largest = max(largest, q.grad.abs().max().item(), grad_r_expected.abs().max().item())
    assert largest > 1e-3


def test_a_malformed_call_on_one_rank_raises_on_every_rank(tmp_path):
    ranks = run_ranks([7, 0, 11], tmp_path)
    for name in ("triplet", "lifted"):
        messages = [rank["errors"][name] for rank in ranks]
        assert messages[0], name
        assert all(m == messages[0] for m in messages), messages
        assert "rank 2 of 3: argument 'labels' has length 10, expected 11" in messages[0], messages[0]


def test_group_of_one_process_and_its_errors():
    """A group of one rank (gloo, in this process): the sharded call is the single-process
    call, with a reference set too; a group that is not one raises."""
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        metricloss.distributed.group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        group = metricloss.distributed.group()
        assert (group.rank, group.size) == (0, 1)
        x, labels = worker.global_batch(18)
        loss_fn = metricloss.BatchTripletLoss(mining="semihard")
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        loss_fn(a, labels, group=group).backward()
        loss_fn(b, labels).backward()
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-14)
        c = x.clone().requires_grad_()
        d = x.clone().requires_grad_()
        self_index = torch.arange(18)
        with_group = loss_fn(a.detach(), labels, ref=c, ref_labels=labels, self_index=self_index,
                             group=group)
        alone = loss_fn(b.detach(), labels, ref=d, ref_labels=labels, self_index=self_index)
        assert with_group.item() == alone.item()  # one rank: the single-process path
        with_group.backward()
        alone.backward()
        assert torch.equal(c.grad, d.grad)
        with pytest.raises(TypeError, match="argument 'group' must be a metricloss.distributed.group"):
            loss_fn(x, labels, group=object())
    finally:
        dist.destroy_process_group()
