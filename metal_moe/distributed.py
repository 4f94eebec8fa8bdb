"""Expert parallelism over torch.distributed: a layer whose experts are spread over the ranks of a
process group, each rank holding a contiguous range of them.

    import torch.distributed as dist
    from metal_moe.distributed import ExpertParallelMoE

    dist.init_process_group("gloo")                    # "nccl" for CUDA, one GPU per rank
    moe = ExpertParallelMoE(weights)                   # the full host MoEWeights; each rank keeps its slice
    y = moe(x, ids, p, routed_scaling_factor=2.5)      # this rank's tokens: x [M_r, hidden], ids/p [M_r, top_k]

One forward, on every rank of the group (each must call it, with its own tokens, possibly none):

1. route (``router_logits=``: the library's native router, the selection of
   :func:`metal_moe.reference.route`), then order this rank's (token, slot) pairs stably by global
   expert id: since every rank owns a contiguous range in rank order, that is by destination rank,
   then expert, then token, then slot;
2. exchange the counts per expert (``all_to_all_single``, int64; each message also carries a flag
   saying whether its sender refused its input, so that every rank stops together, never waiting
   for a rank that raised);
3. exchange the token rows (``all_to_all_single`` with split sizes, sent as raw bytes so that any
   activation dtype crosses any backend); the receiver rebuilds its local expert ids from the counts;
4. run the local experts with :func:`metal_moe.fused_moe` (weight 1, one slot per row, fp32 output:
   each row's expert output ``r``);
5. send the fp32 rows back (the reverse split sizes) and combine them on the rank that owns the
   token: ``y[t] = rsf * sum_j p[t,j] * r[t,j]`` summed in slot order in fp32, plus the shared
   expert, computed on that rank, then cast to x's dtype.

Step 5 is the combine the fused kernels do themselves (fp32, slots in order, then ``rsf``, then the
shared expert), so the result does not depend on the partition.  On the CPU backend it is bitwise
the single-device ``fused_moe`` when both accumulate in fp32 (``use_fp32_acc=True``, the default at
``hidden >= 1024``) or run the same forced ``kernel=``: every variant's per-slot result is
independent of the batch it is computed in, for a given accumulation mode.  Otherwise (the
policy's choice at ``hidden < 1024``, where e.g. a rank that receives one row runs the fp32 decode
kernel and the single-device call an fp16-accumulating one) each result is within the library's
tolerance of the float64 reference (4e-3 relative with fp32 accumulation, 1e-2 with fp16
accumulation; one more rounding of a fp16/bf16 output), so they are within the sum of the two of
each other.  Repeated calls with the same inputs give bitwise the same output.

Tensors are torch tensors: CPU tensors with ``backend="cpu"`` (gloo), CUDA tensors on this rank's
device with ``backend="cuda"`` (nccl).  torch is imported when the class is first used, so that
``import metal_moe.distributed`` works without it.
"""

from __future__ import annotations

import contextlib
import numbers
import time

import numpy as np

from . import api, policy
from .weights import MoEWeights

__all__ = ["ExpertParallelMoE", "SectionTimer", "partition_experts"]

# The tests set this: every buffer the forward allocates is filled with NaN (0xFF bytes) instead of
# left uninitialised, so that a row the exchange or the kernels fail to write shows in the output.
_POISON = False

_ACTIVATIONS = ("float16", "bfloat16", "float32")
_COMM = ("counts", "dispatch", "return")          # the sections that are communication


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise ImportError("metal_moe.distributed needs torch (pip install 'metal-moe[distributed]', or torch>=2.1 "
                          f"on its own): {err}") from err
    if not dist.is_available():
        raise ImportError("metal_moe.distributed needs torch.distributed, which this torch build lacks")
    return torch, dist


def partition_experts(experts, world_size):
    """The default partition: contiguous ``(start, stop)`` ranges in rank order whose sizes differ by
    at most one (the first ``experts % world_size`` ranks hold one more)."""
    base, extra = divmod(int(experts), int(world_size))
    ranges, start = [], 0
    for rank in range(world_size):
        stop = start + base + (rank < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def _check_ranges(ranges, experts, world_size):
    try:
        ranges = [tuple(r) for r in ranges]
    except TypeError:
        raise TypeError("expert_ranges: expected a list of (start, stop) pairs, one per rank") from None
    if len(ranges) != world_size:
        raise ValueError(f"expert_ranges: expected one (start, stop) per rank ({world_size}), got {len(ranges)}")
    expected_start = 0
    for rank, r in enumerate(ranges):
        if len(r) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in r):
            raise TypeError(f"expert_ranges: rank {rank}'s entry {r!r} is not a pair of integers")
        start, stop = int(r[0]), int(r[1])
        if start != expected_start or stop < start:
            raise ValueError(f"expert_ranges: rank {rank} has ({start}, {stop}); the ranges must be contiguous, in "
                             f"rank order, and start at {expected_start} (a rank may own none: (s, s))")
        expected_start = stop
    if expected_start != experts:
        raise ValueError(f"expert_ranges: the ranges end at {expected_start}, but the layer has {experts} experts")
    return [(int(a), int(b)) for a, b in ranges]


class SectionTimer:
    """Seconds spent in each section of :meth:`ExpertParallelMoE.forward` (pass it as ``timer=``).

    ``totals`` maps a section name to its summed seconds over the calls timed so far.  The sections:
    ``route`` (the argument checks and the router), ``counts``, ``dispatch``, ``experts``, ``return``, ``shared``, ``combine``;
    :attr:`communication` sums ``counts``, ``dispatch`` and ``return`` (the counts step includes
    the wait for the split sizes to reach the host).  On CUDA the sections are timed with CUDA
    events on the current stream, read when :meth:`read` is called (which synchronises); on the
    CPU with ``time.perf_counter``."""

    def __init__(self, cuda=False):
        self.cuda = bool(cuda)
        self.totals = {}
        self._events = []

    @contextlib.contextmanager
    def section(self, name):
        if self.cuda:
            import torch

            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            stop.record()
            self._events.append((name, start, stop))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def read(self):
        """The totals (seconds per section), pending CUDA events included."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, stop in self._events:
                self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(stop) / 1e3
            self._events.clear()
        return dict(self.totals)

    @property
    def communication(self):
        totals = self.read()
        return sum(totals.get(name, 0.0) for name in _COMM)

    def reset(self):
        self.read()
        self.totals.clear()


class _NoTimer:
    @staticmethod
    def section(name):
        return contextlib.nullcontext()


class ExpertParallelMoE:
    """One MoE layer's experts spread over the ranks of a torch.distributed process group.

    weights: the layer's full host :class:`~metal_moe.MoEWeights` (every rank loads the same
    layer); each rank keeps views of its own experts, plus the shared expert if any, and with
    ``backend="cuda"`` uploads only those.  group: the process group (None: the default group).
    expert_ranges: ``[(start, stop), ...]`` per rank, contiguous and in rank order, covering all
    experts (a rank may own none); default :func:`partition_experts`.  backend: ``"cpu"`` (host
    tensors, gloo) or ``"cuda"`` (this rank's GPU, nccl); default from the group's backend.
    device: the CUDA device (an index or ``torch.device``; default ``torch.cuda.current_device()``).

    Construction is collective: every rank checks that all ranks hold the same layer shape and
    partition (one ``all_gather``; a difference is refused on every rank).  Arguments are checked
    before that, so ranks given the same bad argument all raise at once; a bad argument on some
    ranks only leaves the others waiting in the ``all_gather`` (until the group's timeout).  See
    the module's documentation for the forward and its accuracy.
    """

    def __init__(self, weights, group=None, *, expert_ranges=None, backend=None, device=None):
        self._torch, self._dist = _torch()
        torch, dist = self._torch, self._dist
        if not dist.is_initialized():
            raise RuntimeError("group: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group(...) on every rank first")
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights: expected the layer's host MoEWeights, got {type(weights).__name__}")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the group")
        self.world_size = dist.get_world_size(group)
        self.backend = self._pick_backend(backend, str(dist.get_backend(group)))
        if self.backend not in api.backends():
            raise ValueError(f"backend: {self.backend!r} is not usable on this machine; usable: {api.backends()}")
        if self.backend == "cuda":
            if device is None:
                device = torch.cuda.current_device()
            device = device if isinstance(device, torch.device) else torch.device("cuda", device)
            if device.type != "cuda" or device.index is None:
                raise ValueError(f"device: expected a CUDA device index, got {device!r}")
            self.device = device
        else:
            if device not in (None, "cpu") and not (isinstance(device, torch.device) and device.type == "cpu"):
                raise ValueError(f"device: the cpu backend runs on the host, got device={device!r}")
            self.device = torch.device("cpu")
        self.hidden, self.experts = weights.hidden, weights.experts
        ranges = partition_experts(self.experts, self.world_size) if expert_ranges is None else expert_ranges
        self.expert_ranges = _check_ranges(ranges, self.experts, self.world_size)
        self.start, self.stop = self.expert_ranges[self.rank]
        self._check_agreement(weights)
        local = weights.select_experts(self.start, self.stop) if self.stop > self.start else None
        shared = None if weights.shared is None else weights.shared.as_block()
        if self.backend == "cuda":
            local = None if local is None else local.to("cuda", self.device.index)
            shared = None if shared is None else shared.to("cuda", self.device.index)
        self.local_weights, self.shared_weights = local, shared

    @staticmethod
    def _pick_backend(backend, group_backend):
        """cpu tensors travel over gloo, cuda tensors over nccl (a mixed "cpu:gloo,cuda:nccl" group
        carries both)."""
        carriers = {"cpu": "gloo", "cuda": "nccl"}
        if backend is None:
            usable = [b for b, c in carriers.items() if c in group_backend]
            if not usable:
                raise ValueError(f"backend: the group's backend {group_backend!r} is neither gloo nor nccl; "
                                 "pass backend='cpu' or 'cuda'")
            return "cuda" if "cuda" in usable and len(usable) > 1 and "cuda" in api.backends() else usable[0]
        if backend not in carriers:
            raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")
        if carriers[backend] not in group_backend:
            raise ValueError(f"backend: {backend!r} needs a {carriers[backend]} process group, the group's backend is "
                             f"{group_backend!r}")
        return backend

    def _check_agreement(self, weights):
        """Every rank must hold the same layer shape and partition, or the exchanges would mismatch."""
        torch = self._torch
        bits = [int(round(2 * b)) for b in weights.bits]
        mine = [weights.hidden, weights.intermediate, weights.experts, weights.shared is not None, *bits]
        mine += [v for r in self.expert_ranges for v in r]
        mine = torch.tensor(mine, dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective("all_gather", every, mine)
        rows = [t.tolist() for t in every]
        for rank, row in enumerate(rows):
            if row != rows[0]:
                raise ValueError(f"weights/expert_ranges: rank {rank} holds a layer or partition that differs from "
                                 f"rank 0's ([hidden, intermediate, experts, shared, 2*bits x3, ranges]: {row} vs "
                                 f"{rows[0]})")

    def _collective(self, name, *args, **kwargs):
        return getattr(self._dist, name)(*args, group=self.group, **kwargs)

    @property
    def local_experts(self):
        """This rank's ``(start, stop)``."""
        return self.start, self.stop

    def __repr__(self):
        return (f"ExpertParallelMoE(rank {self.rank}/{self.world_size}, {self.backend}, experts "
                f"[{self.start}, {self.stop}) of {self.experts}, shared={self.shared_weights is not None})")

    # ---- forward ---------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, x, ids=None, p=None, *, router_logits=None, top_k=None, scoring="softmax", bias=None,
                renormalize=True, routed_scaling_factor=1.0, kernel=None, use_fp32_acc=None, out=None, timer=None):
        """This rank's tokens through the whole layer: ``y [M_r, hidden]``.  Collective: every rank of
        the group must call it (with its own tokens; ``M_r`` may be 0).

        x: ``[M_r, hidden]`` float16/bfloat16/float32 torch tensor, C-contiguous, on this rank's
        device.  ids ``[M_r, top_k]`` int32/int64 global expert ids and p ``[M_r, top_k]``
        float32/float16/bfloat16, or ``router_logits [M_r, experts]`` with ``top_k``, ``scoring``,
        ``bias`` (float32 ``[experts]``) and ``renormalize``, as :func:`metal_moe.fused_moe` takes them.
        kernel, use_fp32_acc: passed to every local ``fused_moe`` call.  out: an optional
        ``[M_r, hidden]`` tensor of x's dtype or float32 (default: a new tensor of x's dtype).
        timer: a :class:`SectionTimer` (or anything with ``section(name)`` returning a context manager).

        Bad input is refused with an error naming the argument, raised after the first exchange:
        the other ranks then raise a RuntimeError naming this rank instead of waiting for it.
        """
        torch = self._torch
        timer = _NoTimer if timer is None else timer
        error = None
        try:
            with timer.section("route"):
                x, ids, p, out = self._prepare(x, ids, p, router_logits, top_k, scoring, bias, renormalize,
                                               routed_scaling_factor, out)
        except (TypeError, ValueError) as err:
            error = err
            x = torch.empty((0, self.hidden), dtype=torch.float32, device=self.device)
            ids = torch.empty((0, 1), dtype=torch.int64, device=self.device)
        tokens, top_k = ids.shape
        flat = ids.reshape(-1).to(torch.int64)

        with timer.section("counts"):
            send_rows, recv_rows, recv_counts = self._exchange_counts(flat, error is not None)
        if error is not None:
            raise error

        # (token, slot) pairs by global expert id: by destination rank, expert, token, slot
        order = torch.sort(flat, stable=True).indices
        with timer.section("dispatch"):
            send = x.index_select(0, order // top_k).view(torch.uint8)
            received = self._empty((sum(recv_rows), send.shape[1]), torch.uint8)
            self._collective("all_to_all_single", received, send, output_split_sizes=recv_rows,
                             input_split_sizes=send_rows)
        with timer.section("experts"):
            results = self._empty((received.shape[0], self.hidden), torch.float32)
            if received.shape[0]:
                local = torch.arange(self.stop - self.start, dtype=torch.int32, device=self.device)
                local_ids = local.repeat(self.world_size).repeat_interleave(recv_counts.reshape(-1),
                                                                            output_size=received.shape[0])
                self._fused(received.view(x.dtype), local_ids[:, None], self.local_weights, results, kernel,
                            use_fp32_acc)
        with timer.section("return"):
            back = self._empty((tokens * top_k, self.hidden), torch.float32)
            self._collective("all_to_all_single", back, results, output_split_sizes=send_rows,
                             input_split_sizes=recv_rows)
        shared = None
        if self.shared_weights is not None and tokens:
            with timer.section("shared"):
                shared = self._empty((tokens, self.hidden), torch.float32)
                # as inside the kernels: a specialised decode runs a shared expert of other bits generically
                generic = kernel is not None and not policy.accepts_bits(kernel, self.shared_weights.bits)
                self._fused(x, torch.zeros((tokens, 1), dtype=torch.int32, device=self.device), self.shared_weights,
                            shared, policy.DECODE if generic else kernel, use_fp32_acc)
        with timer.section("combine"):
            return self._combine(back, order, p.to(torch.float32), routed_scaling_factor, shared, x.dtype, out)

    def _prepare(self, x, ids, p, router_logits, top_k, scoring, bias, renormalize, routed_scaling_factor, out):
        """Checked x, ids [M, k], p [M, k] and out (the router run where asked); errors name the argument."""
        x = self._tensor(x, "x", _ACTIVATIONS).detach()         # inputs are read, never differentiated
        if x.shape[1] != self.hidden:
            raise ValueError(f"x: expected shape [tokens, {self.hidden}], got {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError("x: must be C-contiguous (it is read in place); pass x.contiguous() if a copy is acceptable")
        api._check_rsf(routed_scaling_factor)
        if router_logits is not None:
            if ids is not None or p is not None:
                raise ValueError("router_logits: pass either ids and p or router_logits, not both")
            ids, p = self._route(router_logits, top_k, scoring, bias, renormalize)
        elif top_k is not None or bias is not None:
            raise ValueError("top_k/bias: only used with router_logits")
        if ids is None or p is None:
            raise TypeError("ids, p: required (or pass router_logits= with top_k=)")
        ids = self._tensor(ids, "ids", ("int32", "int64")).detach()
        p = self._tensor(p, "p", _ACTIVATIONS).detach()
        api._check_shapes(x.shape, ids.shape, p.shape, self.hidden)
        if ids.shape[1] < 1:
            raise ValueError(f"ids: expected at least one slot per token, got shape {tuple(ids.shape)}")
        if out is not None:
            out = self._tensor(out, "out", (str(x.dtype).replace("torch.", ""), "float32"))
            if out.shape != x.shape:
                raise ValueError(f"out: expected the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        return x, ids, p, out

    def _tensor(self, value, name, dtypes):
        torch = self._torch
        if not isinstance(value, torch.Tensor):
            hint = " (torch.from_numpy(...) wraps a NumPy array)" if isinstance(value, np.ndarray) else ""
            raise TypeError(f"{name}: expected a torch tensor, got {type(value).__name__}{hint}")
        if value.device != self.device:
            raise ValueError(f"{name}: is on {value.device}, but this rank's {self.backend} backend runs on "
                             f"{self.device}")
        if str(value.dtype).replace("torch.", "") not in dtypes:
            raise TypeError(f"{name}: dtype {value.dtype} is not accepted; expected {', '.join(dtypes)}")
        if value.dim() != 2:
            raise ValueError(f"{name}: expected 2 dimensions, got shape {tuple(value.shape)}")
        return value

    def _route(self, router_logits, top_k, scoring, bias, renormalize):
        """The native router over all experts (the same selection as metal_moe.reference.route)."""
        torch = self._torch
        logits = self._tensor(router_logits, "router_logits", _ACTIVATIONS).detach()
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.device != self.device:
                raise TypeError(f"bias: expected a float32 torch tensor on {self.device}")
            bias = bias.detach()
        if self.backend == "cuda":
            return api._route_device(logits, self.experts, self.device.index, top_k, scoring, bias, renormalize, None)
        ids, p = api._route_host(_host(logits), self.experts, top_k, scoring, None if bias is None else _host(bias),
                                 renormalize)
        return torch.from_numpy(ids), torch.from_numpy(p)

    def _exchange_counts(self, flat, refused):
        """Counts per expert to their owners, a refusal flag in front of each message.  Returns the
        rows to send to / receive from each rank and the received counts [world, local experts]."""
        torch = self._torch
        valid = (flat >= 0) & (flat < self.experts)
        # bucket `experts` counts the ids outside [0, experts)
        counts = torch.bincount(torch.where(valid, flat, self.experts), minlength=self.experts + 1)
        flag = (counts[self.experts:] > 0) | refused
        pieces = []
        for start, stop in self.expert_ranges:
            pieces += [flag.to(torch.int64), counts[start:stop]]
        send = torch.cat(pieces)
        local = self.stop - self.start
        received = torch.empty((self.world_size, 1 + local), dtype=torch.int64, device=self.device)
        sizes = [1 + stop - start for start, stop in self.expert_ranges]
        self._collective("all_to_all_single", received.view(-1), send,
                         output_split_sizes=[1 + local] * self.world_size, input_split_sizes=sizes)
        host = torch.cat([counts, received.view(-1)]).tolist()        # one transfer (CUDA: one sync)
        mine = host[:self.experts + 1]
        incoming = np.array(host[self.experts + 1:], dtype=np.int64).reshape(self.world_size, 1 + local)
        if mine[self.experts]:
            raise ValueError(f"ids: {mine[self.experts]} expert ids are outside [0, {self.experts}) (experts)")
        refusing = [rank for rank in np.flatnonzero(incoming[:, 0]).tolist() if rank != self.rank]
        if refusing and not refused:
            raise RuntimeError(f"ExpertParallelMoE.forward: rank(s) {refusing} refused their input (see the error "
                               "raised there); this rank stops too rather than wait for them")
        send_rows = [sum(mine[start:stop]) for start, stop in self.expert_ranges]
        return send_rows, incoming[:, 1:].sum(axis=1).tolist(), received[:, 1:]

    def _fused(self, x, ids, weights, out, kernel, use_fp32_acc):
        """out (float32) = each row through its one expert, weight 1 (host or device arrays)."""
        ones = self._torch.ones(ids.shape, dtype=self._torch.float32, device=self.device)
        if self.backend == "cpu":
            x, ids, ones, out = _host(x), _host(ids), _host(ones), _host(out)
        api.fused_moe(x, ids, ones, weights, kernel=kernel, use_fp32_acc=use_fp32_acc, out=out)

    def _combine(self, back, order, p, routed_scaling_factor, shared, dtype, out):
        """``y[t] = rsf * sum_j p[t,j] r[t,j] + shared[t]`` in fp32, slots in order (the kernels' combine)."""
        torch = self._torch
        tokens, top_k = p.shape
        where = torch.empty_like(order)
        where[order] = torch.arange(order.numel(), device=self.device)   # row of back holding slot t*k + j
        where = where.view(tokens, top_k)
        acc = out if out is not None and out.dtype == torch.float32 else self._empty((tokens, self.hidden),
                                                                                     torch.float32)
        acc.zero_()
        for j in range(top_k):
            acc += p[:, j:j + 1] * back.index_select(0, where[:, j])
        acc *= float(np.float32(routed_scaling_factor))
        if shared is not None:
            acc += shared
        if acc is out:
            return out
        if out is not None:
            return out.copy_(acc)
        return acc if dtype == torch.float32 else acc.to(dtype)

    def _empty(self, shape, dtype):
        torch = self._torch
        if not _POISON:
            return torch.empty(shape, dtype=dtype, device=self.device)
        fill = 0xFF if dtype == torch.uint8 else float("nan")
        return torch.full(shape, fill, dtype=dtype, device=self.device)


def _host(tensor):
    """A CPU torch tensor as the NumPy array over the same memory (bfloat16 as its uint16 storage,
    which fused_moe reads as bfloat16)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
