"""The global batch across the processes of a ``torch.distributed`` process group.

    import torch.distributed as dist
    import metricloss, metricloss.distributed
    dist.init_process_group("gloo", ...)
    group = metricloss.distributed.group()            # or group(process_group)
    loss_fn = metricloss.BatchTripletLoss(mining="semihard")
    loss = loss_fn(x_local, labels_local, group=group)  # the loss of the global batch
    (loss * group.size).backward()   # under DDP, which averages gradients over the W ranks
    log(loss.item())                 # the global batch's loss, the same on every rank

Rank r passes its rows x_r (any number, 0 included: a (0, D) tensor) of the global batch
X = concat_r(x_r), in rank order. Every rank gets the loss of X, bitwise the same on all
ranks, and x_r.grad is exactly rank r's rows of dL/dX: no gradient is reduced by metricloss.
The sum over ranks of each replica's parameter gradient is then the gradient of L; DDP averages
instead, so scale the loss by W before backward (the C++ library's top_diff = W) and log the
unscaled value. Every rank must make the same sequence of calls with the same options; a
malformed call on any rank raises the same ValueError on every rank, naming that rank.

metricloss's C++ layer computes statistics for its own rows against the gathered global batch
(hard and semihard batch triplets, and lifted structure from 4 ranks) or runs the whole loss on
it (the other losses and modes); the exchanges go through this process group's all_gather, on
CPU tensors (gloo, or MPI), padded to the longest rank's bytes since all_gather needs equal
shapes.

With a reference set, ``loss_fn(q_local, labels_local, ref=r, ref_labels=yr, self_index=s_local,
group=group)``: the queries are sharded, r and yr must be the same on every rank, bitwise (the
ranks compare a hash of them and all raise if one differs), and s_local gives this rank's
queries' rows of r. Every rank gets the loss of (Q = the concatenated queries, r), its rows of
dL/dQ and all of dL/dr (the same on every rank); each rank computes the whole loss.
"""
import torch
import torch.distributed as dist

from . import _C

__all__ = ["group"]


class group:
    """metricloss's group concept over a ``torch.distributed`` process group (None: the
    default group): ``rank``, ``size``, and an all-gather of bytes that differ in length
    between ranks, on CPU tensors."""

    def __init__(self, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("metricloss.distributed.group: torch.distributed is not "
                               "initialised (call torch.distributed.init_process_group first)")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        self._c = _C.Group(self.rank, self.size, self._all_gather)

    def _all_gather(self, send, counts):
        """Rank q's counts[q] bytes, for every q, from `send` (this rank's bytes): one
        all_gather of buffers padded to max(counts) (at least 1 byte)."""
        width = max(max(counts), 1)
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:send.numel()] = send
        parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.process_group)
        return [part[:count] for part, count in zip(parts, counts)]

    def __repr__(self):
        return f"metricloss.distributed.group(rank={self.rank}, size={self.size})"
