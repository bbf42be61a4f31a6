"""PatchCore (Roth et al., CVPR 2022): a greedy-coreset memory bank of locally aware patch features scored by
nearest-neighbour distance, computing what anomalib's ``PatchcoreModel`` computes, only faster."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from helpers import backbones, registry
from helpers.detector import Detector, Prediction, read_model, write_model
from helpers.threads import one_torch_thread

MAP_SIGMA = 4.0  # Gaussian smoothing of the anomaly map, in pixels (paper and anomalib)


# --- embedding ----------------------------------------------------------------------------------------------

def patch_embedding(feats: dict[str, torch.Tensor], stages: Sequence[str],
                    target_dim: int | None = None) -> torch.Tensor:
    """``(N, C, h, w)`` locally aware patch features on the grid of the first (shallowest) stage.

    Each stage is averaged over 3x3 neighbourhoods, deeper stages are resized bilinearly to the first stage's
    grid and all are concatenated: anomalib's ``feature_pooler`` + ``generate_embedding``, op for op.
    """
    # Channels-last gives bit-identical results faster, and makes rows_of() a view instead of a copy.
    pooled = [F.avg_pool2d(feats[s].float().contiguous(memory_format=torch.channels_last), 3, 1, 1) for s in stages]
    grid = pooled[0].shape[-2:]
    parts = [pooled[0]] + [F.interpolate(p, size=grid, mode="bilinear") for p in pooled[1:]]
    if target_dim is not None:
        # The paper's reference code pools every stage to the target width, then pools their concatenation,
        # so each stage weighs the same whatever its channel count.
        parts = [_pool_channels(p, target_dim) for p in parts]
        return _pool_channels(torch.cat(parts, 1), target_dim)
    return torch.cat(parts, 1)


def _pool_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(rows, width).reshape(n, h, w, width).permute(0, 3, 1, 2)


def rows_of(embedding: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` to one row per patch ``(N*h*w, C)``, image-major, as anomalib's ``reshape_embedding``."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])


# --- coreset ------------------------------------------------------------------------------------------------

def random_projection(points: torch.Tensor, projection_dim: int | None, seed: int) -> torch.Tensor:
    """Seeded Gaussian projection to ``projection_dim`` (Johnson-Lindenstrauss); identity when it would not shrink."""
    if projection_dim is None or projection_dim >= points.shape[1]:
        return points.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(points.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
    return (points.float() @ matrix.to(points.device)).contiguous()


def coreset_indices(points: torch.Tensor, ratio: float, projection_dim: int | None = 128,
                    seed: int = 0) -> torch.Tensor:
    """Rows of ``points`` kept by greedy k-center selection of ``int(N * ratio)`` rows on projected features."""
    n = int(len(points) * ratio)
    if n < 1:
        raise ValueError(f"coreset_ratio {ratio} keeps no patch out of {len(points)}")
    projected = random_projection(points, projection_dim, seed)
    start = int(torch.randint(len(points), (1,), generator=torch.Generator().manual_seed(seed)))
    return greedy_kcenter(projected, n, start)


@torch.no_grad()
def greedy_kcenter(points: torch.Tensor, n: int, start: int, block: int = 256) -> torch.Tensor:
    """Exact greedy k-center (farthest-point) selection of ``n`` rows, starting from row ``start``.

    Picks what the textbook loop picks (per step: distances of all points to the newest centre, running
    minimum, argmax), but evaluates it lazily. The bank is cut into blocks that each keep an upper bound of
    their largest min-distance (their exact maximum when last refreshed; min-distances only shrink). A step
    refreshes the block with the largest bound against every centre it has not seen yet, until that block is
    up to date: its maximum is then the global one. A refresh is one (block x new centres) matrix product.

    Why: the textbook loop is one memory-bound pass over the bank per step (reduced-precision matrix-vector
    products do not help it, and AMX only speeds up matrix-matrix products); here the same arithmetic runs as
    cache-resident BLAS-3 (``helpers.bench`` times it against anomalib's KCenterGreedy in the same run).
    Pruning blocks by the triangle inequality was tried and skips almost nothing in 128 dimensions. Float32
    throughout, because reduced precision changes which points are picked; a different summation order than
    the one-pass loop only reorders picks that tie to float32 rounding (same set of 10,240).
    """
    N = len(points)
    if not 1 <= n <= N:
        raise ValueError(f"cannot select {n} of {N} points")
    # One thread: OpenMP threads on two cores that other work also uses stall each other by orders of magnitude.
    with one_torch_thread(points.device.type == "cpu"):
        return _greedy_kcenter(points, n, start, block)


def _greedy_kcenter(points: torch.Tensor, n: int, start: int, block: int) -> torch.Tensor:
    N, dim = points.shape
    sq = (points * points).sum(1)
    min_d = torch.full((N,), float("inf"), device=points.device)
    n_blocks = -(-N // block)
    bound = torch.full((n_blocks,), float("inf"), device=points.device)
    best = torch.zeros(n_blocks, dtype=torch.long, device=points.device)
    seen = [0] * n_blocks  # centres each block has been compared with
    centres = points.new_empty((n, dim))
    centre_sq = sq.new_empty(n)
    chosen = [start]
    centres[0], centre_sq[0] = points[start], sq[start]
    for k in range(1, n):
        while True:
            b = int(torch.argmax(bound))
            if seen[b] == k:
                break
            lo, hi, s = b * block, min(N, (b + 1) * block), seen[b]
            # ||x - c||^2 = ||c||^2 - 2 x.c + ||x||^2; minimum over the new centres before adding ||x||^2
            d = torch.addmm(centre_sq[s:k], points[lo:hi], centres[s:k].T, alpha=-2).amin(1).add_(sq[lo:hi])
            torch.minimum(min_d[lo:hi], d.clamp_min_(0), out=min_d[lo:hi])
            value, where = min_d[lo:hi].max(0)
            bound[b], best[b], seen[b] = value, where + lo, k
        idx = int(best[b])
        min_d[idx] = 0  # a chosen point is never chosen again, whatever the rounding of its self-distance
        bound[b] = float("inf")  # its block changed: refresh it before trusting its bound again
        centres[k], centre_sq[k] = points[idx], sq[idx]
        chosen.append(idx)
    return torch.tensor(chosen, dtype=torch.long)


# --- nearest-neighbour search -------------------------------------------------------------------------------

_U = 2.0 ** -8  # unit roundoff of bfloat16
_BLOCK = 64  # bank columns per block when collecting candidates
_GROUP = 1024  # fewest queries prepared and re-scored together (more when one product holds more)
_MAX_CHUNK = 8192  # most queries per product and group (5 MB of float32 queries at 152 dimensions)
_SCRATCH_LIMIT = 16 * 2 ** 20  # bytes a scratch buffer may keep between searches; larger ones are freed after use
_PRODUCT_SIZE = 256 * 10240  # elements of one bfloat16 product (5 MB): 256 queries against 10,240 bank rows


def _bf16_parts(x: torch.Tensor) -> torch.Tensor:
    """``(n,)`` float64 as three bfloat16 parts ``(n, 3)`` whose sum is ``x`` to float32 precision."""
    parts, rest = [], x
    for _ in range(3):
        part = rest.to(torch.bfloat16)
        parts.append(part)
        rest = rest - part.double()
    return torch.stack(parts, 1)


def _bf16_split(x: torch.Tensor, out: torch.Tensor) -> None:
    """``(n,)`` float32 as three bfloat16 parts written to ``out`` ``(n, 3)``; their sum is ``x`` exactly (each
    remainder of rounding a float32 to fewer bits is itself a float32), the same parts as ``_bf16_parts``."""
    rest = x
    for i in range(3):
        out[:, i] = rest  # rounded to nearest
        rest = rest - out[:, i].float()


class _Workspace:
    """Scratch buffers by name, grown when too small and otherwise re-used, so that repeated searches write into
    memory that is already mapped instead of faulting in fresh pages. A request above ``limit`` bytes gets a
    fresh tensor that is not kept: what stays allocated is at most ``limit`` per name."""

    def __init__(self, limit: int = _SCRATCH_LIMIT) -> None:
        self.limit = limit
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if n * dtype.itemsize > self.limit:
            return torch.empty(*shape, dtype=dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.dtype.itemsize for b in self._buffers.values())


_THREAD = threading.local()


def _workspace() -> _Workspace:
    """This thread's scratch buffers, shared by every index: their size follows the largest search so far, up to
    ``_SCRATCH_LIMIT`` per buffer (seven of them), not the number of models alive."""
    if not hasattr(_THREAD, "space"):
        _THREAD.space = _Workspace()
    return _THREAD.space


def fast_bf16_available() -> bool:
    """True where bfloat16 matrix products run several times faster than float32 ones: AMX tiles (Sapphire
    Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4 and later)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe and probe()) for probe in probes)


class BankIndex:
    """Exact 1-nearest-neighbour search over the memory bank.

    On CPUs with fast bfloat16 products (AMX or AVX512-BF16), squared distances are first approximated by one
    bfloat16 matrix product (several times the speed of float32 there), then every bank row
    whose approximation lies within a rigorous rounding-error bound of the row's smallest approximation is
    re-scored in float32 and the best is kept. The result is the nearest neighbour in float32 (on the benchmark
    data it matched a float64 search everywhere, where faiss's float32 expansion misses near-ties). The bound
    uses the actual bfloat16 rounding residues of the bank rows and of each query, not their worst case, and
    admits a few candidates per query on real features. faiss's exact ``IndexFlatL2`` is the fallback on CPUs
    without fast bfloat16 (and the slower path: the README gives both timings); on CUDA a float32 matrix product
    does it (faiss-cpu has no GPU index). Every path returns the distance recomputed as ``sum((q - m)^2)``, so
    the backends agree to float32 rounding.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto") -> None:
        self.bank = bank.float().contiguous()
        if backend == "auto":
            backend = "torch" if bank.is_cuda else ("bf16" if fast_bf16_available() else "faiss")
        self.backend = backend
        if backend == "bf16":
            if bank.is_cuda:
                raise ValueError("the bf16 search backend runs on the CPU; use 'torch' for a CUDA bank")
            self._build_bf16()
        elif backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatL2(self.bank.shape[1])
            self._faiss.add(self.bank.cpu().numpy())
        elif backend != "torch":
            raise ValueError(f"unknown search backend {backend!r}")

    def _build_bf16(self) -> None:
        self.mean = self.bank.mean(0)
        centred = self.bank - self.mean  # centring shrinks the dot products, hence their rounding error
        rounded = centred.bfloat16()
        # Largest norm of a rounded bank row and of its rounding residue, for the error bound of q.m.
        self.max_norm = float(rounded.double().norm(dim=1).max())
        self.max_residue = float((centred.double() - rounded.double()).norm(dim=1).max())
        self.mean_norm = float(self.mean.double().norm())
        # Augmented rows so that one product yields ||q||^2 + ||m||^2 - 2 q.m directly; the norms ride in
        # three bfloat16 parts each, so only the -2 q.m term carries bfloat16 input rounding (the -2 is exact).
        ones = torch.ones(len(centred), 3, dtype=torch.bfloat16)
        rows = torch.cat([rounded * -2, _bf16_parts((centred.double() ** 2).sum(1)), ones], 1)
        far = torch.zeros(-len(rows) % _BLOCK, rows.shape[1], dtype=torch.bfloat16)
        # Padding rows sit 1e30 beyond every query (||q||^2 + 1e30, through their ones): never a candidate.
        far[:, -6], far[:, -3:] = 1e30, 1
        self.aug = torch.cat([rows, far]).contiguous()
        self.n_blocks = len(self.aug) // _BLOCK

    def search(self, queries: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance to, and index of, the nearest bank row for each query row; ``chunk`` queries at a
        time (default: sized to the bank for bf16, 512 otherwise)."""
        queries = queries.float().to(self.bank.device)
        if self.backend == "bf16":
            sized = max(64, min(_MAX_CHUNK, _PRODUCT_SIZE // len(self.aug) // 64 * 64))  # multiples of 64
            return self._search_bf16(queries, chunk or sized)
        chunk = chunk or 512
        out = [self._search_chunk(queries[i:i + chunk]) for i in range(0, len(queries), chunk)]
        return torch.cat([d for d, _ in out]), torch.cat([i for _, i in out])

    def _search_chunk(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "faiss":
            _, found = self._faiss.search(q.cpu().numpy(), 1)
            idx = torch.from_numpy(found[:, 0]).to(q.device)
        else:
            idx = _sq_dists(q, self.bank).argmin(1)
        diff = q - self.bank[idx]
        return torch.linalg.vecdot(diff, diff), idx

    def _search_bf16(self, q: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Products and their reduction over ``chunk`` queries at a time, everything else per group of queries.

        Where the time goes shaped this loop more than the arithmetic did. Every temporary above glibc's mmap
        threshold (128 kB until a large block is freed) is mapped afresh and faulted in page by page, which here
        costs more than the arithmetic it holds, so products and temporaries live in scratch buffers that every
        search on this thread re-uses (``_workspace``). A torch call has a fixed cost that dwarfs a few thousand
        elements' work, and so does switching torch to one thread and back, so per-query bookkeeping runs once per
        group, and candidates are collected and re-scored with numpy: single-threaded by nature, cheap per call,
        and it leaves no OpenMP region to stall when other work shares the cores. Only the queries' preparation,
        the product and the one pass over it are torch's.
        """
        d2 = np.empty(len(q), np.float32)
        idx = np.empty(len(q), np.int64)
        group = max(chunk, _GROUP)  # small banks: one product per group, fewer calls per query
        space = _workspace()
        for start in range(0, len(q), group):
            part = q[start:start + group]
            lhs, slack = self._bf16_queries(part, space)
            rows, cols = [], []
            for first in range(0, len(part), chunk):
                block = lhs[first:first + chunk]
                approx = torch.matmul(block, self.aug.T, out=space.get("approx", (len(block), len(self.aug)),
                                                                         torch.bfloat16))
                approx = approx.view(torch.int16).view(-1, self.n_blocks, _BLOCK)
                block_min = torch.amin(approx, 2, out=space.get("block_min", approx.shape[:2], torch.int16))
                r, c = _bf16_candidates(approx.numpy(), block_min.numpy(), slack[first:first + chunk])
                rows.append(r + first)
                cols.append(c)
            if max(c.max(initial=0) for c in cols) >= len(self.bank):
                raise ValueError("queries too large for the bfloat16 search (a padding row became a candidate); "
                                 "use BankIndex(bank, 'faiss')")
            d2[start:start + group], idx[start:start + group] = _best_of_candidates(
                part, self.bank, np.concatenate(rows), np.concatenate(cols), space)
        return torch.from_numpy(d2), torch.from_numpy(idx)

    def _bf16_queries(self, q: torch.Tensor, space: _Workspace) -> tuple[torch.Tensor, np.ndarray]:
        """Left operand ``(n, D + 6)`` of the product, and per query the additive part of its error bound."""
        n, dim = q.shape
        centred = torch.sub(q, self.mean, out=space.get("centred", (n, dim), torch.float32))
        lhs = space.get("lhs", (n, dim + 6), torch.bfloat16)
        lhs[:, :dim] = centred  # rounded to nearest, as .bfloat16() rounds
        lhs[:, dim:dim + 3] = 1
        norm2 = torch.linalg.vecdot(centred, centred)
        if not bool(torch.isfinite(norm2).all()):
            raise ValueError("queries hold NaN or infinite values, or values too large to square in float32")
        _bf16_split(norm2, lhs[:, dim + 3:])
        residue = torch.linalg.vector_norm(centred.sub_(lhs[:, :dim]), dim=1)  # exact differences in float32
        # |approx - d^2| <= slack + output rounding, where slack bounds: the bfloat16 input rounding of -2 q.m,
        # 2 (|q^||dm| + |dq||m^| + |dq||dm|) with q = q^ + dq and m = m^ + dm (residues measured, not assumed;
        # |q^| <= |q| + |dq|); float32 accumulation over K terms of total size <= (|q| + |m|)^2 (2x margin),
        # which also covers the float32 sum in ||q||^2; the float32 rounding of centring and of the norms'
        # three-part split (generously). Norms are float32 sums of <= D squares, hence the 1 + 2^-10.
        q_residue = residue.numpy().astype(np.float64) * (1 + 2 ** -10)
        q_norm = np.sqrt(norm2.numpy().astype(np.float64)) * (1 + 2 ** -10) + q_residue
        both = q_norm + q_residue + self.max_norm + self.max_residue
        slack = (2 * (q_norm * self.max_residue + q_residue * (self.max_norm + self.max_residue))
                 + lhs.shape[1] * 2 ** -23 * both ** 2 + 2 ** -20 * (both + self.mean_norm) ** 2)
        return lhs, slack * (1 + 2 ** -10)


def _bf16_candidates(approx: np.ndarray, block_min: np.ndarray, slack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query row, bank row) pairs, sorted, whose bfloat16 approximations ``approx`` ``(n, blocks, _BLOCK)`` of
    the squared distance can belong to the query's float32 nearest neighbour, given each query's float64
    ``slack`` ``(n,)`` and ``block_min``, the smallest approximation per block. Every query gets at least one.

    bfloat16 bit patterns are read as int16 (``approx``, ``block_min``): that orders non-negative values, and
    int16 reductions are several times faster than bfloat16 ones.
    """
    # Any approximation is a valid anchor for the bound below; the int16 minimum is the smallest non-negative
    # one (or some negative one, only possible for near-zero distances).
    anchor = (block_min.min(1).view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    # true min d^2 <= anchor (1 + beta) + slack and true d^2 >= approx (1 - beta) - slack for every row; beta
    # is the output rounding, doubled in case a kernel truncates instead of rounding.
    beta = 2 * _U / (1 - 2 * _U)
    limit = np.maximum((anchor + beta * np.abs(anchor) + 2 * slack) / (1 - beta), 0) * (1 + 2 ** -20)
    # Rounded up to the next bfloat16, as int16: the top half of the float32 bits, carried when the rest is > 0.
    limit16 = ((limit.astype(np.float32).view(np.uint32) + 0xFFFF) >> 16).astype(np.int16)
    flat = np.flatnonzero(block_min <= limit16[:, None])
    r, b = np.divmod(flat, block_min.shape[1])
    hit = np.flatnonzero(approx.reshape(-1, _BLOCK)[flat] <= limit16[r, None])
    k, offset = np.divmod(hit, _BLOCK)
    return r[k], b[k] * _BLOCK + offset


def _best_of_candidates(q: torch.Tensor, bank: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                        space: _Workspace) -> tuple[np.ndarray, np.ndarray]:
    """Float32 distance ``sum((q - m)^2)`` to, and index of, the nearest of each query's candidate bank rows;
    ``rows`` sorted, every query present. Ties go to the lowest bank index, as argmin's do.

    Most queries have one candidate: every query's first candidate row is gathered into a scratch buffer and the
    queries are subtracted from it there (torch, on all threads, with no copy of the queries); only the further
    candidates are gathered together with their queries. The sums are numpy's, row by row, either way.
    """
    dim = q.shape[1]
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    d2 = np.empty(len(rows), np.float32)
    first = space.get("first", (len(starts), dim), torch.float32)
    torch.index_select(bank, 0, torch.from_numpy(cols[starts]), out=first)
    torch.sub(q, first, out=first)
    d2[starts] = np.einsum("ij,ij->i", first.numpy(), first.numpy())
    if len(starts) < len(rows):
        more = np.ones(len(rows), bool)
        more[starts] = False
        more = np.flatnonzero(more)
        shape = (len(more), dim)
        # mode="clip": with the default mode numpy buffers ``out`` (a fresh temporary); _search_bf16 has checked
        # that every index is a bank row.
        diff = np.take(q.numpy(), rows[more], axis=0, out=space.get("diff", shape, torch.float32).numpy(),
                       mode="clip")
        diff -= np.take(bank.numpy(), cols[more], axis=0, out=space.get("rows", shape, torch.float32).numpy(),
                        mode="clip")
        d2[more] = np.einsum("ij,ij->i", diff, diff)
    best = np.minimum.reduceat(d2, starts)
    hits = np.flatnonzero(d2 == best[rows])
    first_hit = hits[np.diff(rows[hits], prepend=-1) != 0]  # cols ascend within a query: its first is the lowest
    return best, cols[first_hit]


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """anomalib's ``euclidean_dist`` before its square root (same operation order, so the same ties)."""
    res = torch.matmul(x, y.transpose(-2, -1)).mul_(-2)
    res.add_(x.pow(2).sum(-1, keepdim=True)).add_(y.pow(2).sum(-1, keepdim=True).transpose(-2, -1))
    return res.clamp_min_(0)


# --- scores and maps ----------------------------------------------------------------------------------------

def image_scores(patch_scores: torch.Tensor, locations: torch.Tensor, embedding: torch.Tensor,
                 bank: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's re-weighted image score, as anomalib's ``compute_anomaly_score``.

    ``patch_scores``/``locations`` ``(B, P)``: distance to, and bank index of, each patch's nearest neighbour;
    ``embedding`` ``(B, P, C)``. The largest patch score is damped when that patch's nearest bank patch sits in
    a dense part of the bank (it is then close to its k neighbours as well).
    """
    if k == 1:
        return patch_scores.amax(1)
    rows = torch.arange(len(patch_scores), device=patch_scores.device)
    worst = patch_scores.argmax(1)
    score = patch_scores[rows, worst]
    nn_sample = bank[locations[rows, worst]]
    support = _sq_dists(nn_sample, bank).sqrt_().topk(min(k, len(bank)), dim=1, largest=False).indices
    dists = ((embedding[rows, worst][:, None] - bank[support]) ** 2).sum(-1).sqrt()
    return (1 - torch.softmax(dists, 1))[:, 0] * score


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    size = 2 * int(4.0 * sigma + 0.5) + 1  # anomalib's AnomalyMapGenerator
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


@lru_cache(maxsize=8)
def _map_operator(grid: int, image_size: int, sigma: float) -> torch.Tensor:
    """``(image_size, grid)`` matrix L such that ``L @ P @ L.T`` is the anomaly map of a square patch-score grid P.

    Bilinear upsampling (align_corners=False) and anomalib's ``GaussianBlur2d`` (reflect padding, a kernel that
    is an outer product) are both separable and linear, so the whole map is two small matrix products, far
    cheaper than running the blur as a convolution. L is built by applying the very same torch ops to the unit
    vectors, so it cannot drift from them.
    """
    eye = torch.eye(grid, dtype=torch.float64).unsqueeze(1)  # (grid, 1, grid): one unit vector per row
    up = F.interpolate(eye, size=image_size, mode="linear", align_corners=False)
    kernel = _gaussian_kernel(sigma)
    half = len(kernel) // 2
    blurred = F.conv1d(F.pad(up, (half, half), mode="reflect"), kernel.view(1, 1, -1))
    return blurred[:, 0].T.float().contiguous()


def anomaly_maps(patch_scores: torch.Tensor, image_size: int, sigma: float = MAP_SIGMA,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, h, w)`` patch scores to ``(B, image_size, image_size)`` maps: bilinear upsampling (the paper's code;
    anomalib 2.7 upsamples with nearest neighbour, the one place we differ), then anomalib's Gaussian blur.
    ``out``, when given, receives the maps (same device), so a caller can fill its result array in place."""
    rows = _map_operator(patch_scores.shape[-2], image_size, sigma).to(patch_scores.device)
    cols = _map_operator(patch_scores.shape[-1], image_size, sigma).to(patch_scores.device)
    return torch.matmul(rows @ patch_scores, cols.T, out=out)


# --- detector -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchCoreSettings:
    """The profile block ``methods.patchcore``."""

    coreset_ratio: float = 0.01  # share of training patches kept in the memory bank
    k: int = 9  # bank neighbours of the image-score re-weighting (1: no re-weighting)
    stages: tuple[str, ...] | None = None  # None: the backbone's stride-8 and stride-16 stages
    projection_dim: int | None = 128  # random projection for the coreset distances
    target_dim: int | None = None  # channel pooling of the embedding (the paper's reference code)


def default_stages(backbone: str) -> tuple[str, ...]:
    """The mid-level pair (ResNet's layer2 + layer3): the second and third of the backbone's stages."""
    return tuple(backbones.spec(backbone).stage_names[1:3])


class PatchCore(Detector):
    """Our PatchCore: memory bank from a fast exact greedy coreset, exact nearest-neighbour scoring."""

    method = "patchcore"
    INFERENCE_SETTINGS = ("k",)  # k only re-weights scores: the memory bank does not depend on it

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] | None = None,
                 image_size: int = 256, coreset_ratio: float = 0.1, k: int = 9, target_dim: int | None = None,
                 projection_dim: int | None = 128, seed: int = 0, device: str = "auto",
                 cache_dir: str | Path | None = None) -> None:
        self.backbone = backbone
        order = list(backbones.spec(backbone).stages)
        # Shallowest first: its grid is the patch grid, the deeper stages are resized to it.
        self.stages = tuple(sorted(backbones.check_stages(backbone, stages or default_stages(backbone)),
                                   key=order.index))
        self.image_size = int(image_size)
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.coreset_ratio = float(coreset_ratio)
        self.k = int(k)
        self.target_dim = None if target_dim is None else int(target_dim)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.seed = int(seed)
        self.device = backbones.resolve_device(device)
        self.cache_dir = cache_dir
        self.memory_bank: torch.Tensor | None = None
        # Row of each bank patch among the training patches (image-major, h*w per image): where it came from.
        self.bank_sources: torch.Tensor | None = None
        self._index: BankIndex | None = None

    @classmethod
    def from_settings(cls, settings: PatchCoreSettings, *, backbone: str, image_size: int, seed: int,
                      device: str = "auto", cache_dir: str | Path | None = None) -> "PatchCore":
        return cls(backbone=backbone, stages=settings.stages, image_size=image_size,
                   coreset_ratio=settings.coreset_ratio, k=settings.k, target_dim=settings.target_dim,
                   projection_dim=settings.projection_dim, seed=seed, device=device, cache_dir=cache_dir)

    def settings(self) -> dict:
        # device and cache_dir change where and how fast, never what: they stay out, as in Padim.settings().
        return {"backbone": self.backbone, "stages": list(self.stages), "image_size": self.image_size,
                "coreset_ratio": self.coreset_ratio, "k": self.k, "target_dim": self.target_dim,
                "projection_dim": self.projection_dim, "seed": self.seed}

    def embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features ``{stage: (N, C, h, w)}`` to patch embeddings ``(N, D, h, w)`` on the device."""
        return patch_embedding({s: feats[s].to(self.device) for s in self.stages}, self.stages, self.target_dim)

    @torch.no_grad()
    def fit_features(self, feats: dict[str, torch.Tensor]) -> "PatchCore":
        """Build the memory bank from normal images' features ``{stage: (N, C, h, w)}``."""
        patches = rows_of(self.embed(feats))
        keep = torch.arange(len(patches))
        if self.coreset_ratio < 1:
            keep = coreset_indices(patches, self.coreset_ratio, self.projection_dim, self.seed)
        self.memory_bank = patches[keep.to(patches.device)].contiguous()
        self.bank_sources = keep
        self._index = None
        return self

    def index(self) -> BankIndex:
        """The nearest-neighbour index over the memory bank, built on first use."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.predict before fit (or load)")
        if self._index is None:
            self._index = BankIndex(self.memory_bank)
        return self._index

    @torch.no_grad()
    def predict_features(self, feats: dict[str, torch.Tensor], batch_size: int = 64) -> Prediction:
        """Image scores and ``image_size`` anomaly maps, as anomalib's eval-mode ``PatchcoreModel`` (but with
        bilinear map upsampling)."""
        n = len(feats[self.stages[0]])
        index = self.index()
        # Results are written into their final arrays as they come: no concatenation or dtype copies after.
        scores = torch.empty(n)
        maps = torch.empty(n, self.image_size, self.image_size)
        for start in range(0, n, batch_size):  # bounds memory; results do not depend on it
            emb = self.embed({s: feats[s][start:start + batch_size] for s in self.stages})
            b, _, h, w = emb.shape
            rows = rows_of(emb)
            d2, loc = index.search(rows)
            patch = d2.sqrt_().view(b, h * w)
            scores[start:start + b] = image_scores(patch, loc.view(b, -1), rows.view(b, h * w, -1), self.memory_bank,
                                                   self.k).cpu()
            grid = patch.view(b, h, w)
            if grid.is_cuda:
                maps[start:start + b] = anomaly_maps(grid, self.image_size).cpu()
            else:
                anomaly_maps(grid, self.image_size, out=maps[start:start + b])
        return Prediction(scores.numpy(), maps.numpy())

    def save(self, path: str | Path) -> Path:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.save before fit")
        return write_model(path, {"memory_bank": self.memory_bank, "bank_sources": self.bank_sources},
                           self.method, self.settings())

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", cache_dir: str | Path | None = None) -> "PatchCore":
        detector, tensors = read_model(cls, path, device, cache_dir)
        detector.memory_bank, detector.bank_sources = tensors["memory_bank"], tensors["bank_sources"].cpu()
        return detector

    @torch.no_grad()
    def patch_neighbours(self, feats: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Per test patch ``(N, h, w)``: its distance to the nearest bank entry and the training-patch row
        (image-major) that entry was sampled from."""
        emb = self.embed(feats)
        n, _, h, w = emb.shape
        d2, loc = self.index().search(rows_of(emb))
        sources = self.bank_sources.to(loc.device)[loc]
        return d2.sqrt().view(n, h, w).cpu().numpy(), sources.view(n, h, w).cpu().numpy()

    @torch.no_grad()
    def adapted(self, feats: dict[str, torch.Tensor]) -> "PatchCore":
        """This model's memory bank plus a coreset (same ratio, same seed) of the patches of the normal images
        ``feats``: the source domain stays covered and the new images' patches become neighbours too. The new
        entries' ``bank_sources`` are -1 (they come from no source training image). ``self`` is unchanged."""
        import copy

        if self.memory_bank is None:
            raise RuntimeError("PatchCore.adapted before fit (or load)")
        patches = rows_of(self.embed(feats))
        keep = torch.arange(len(patches))
        if self.coreset_ratio < 1:
            keep = coreset_indices(patches, self.coreset_ratio, self.projection_dim, self.seed)
        added = patches[keep.to(patches.device)].to(self.memory_bank.device)
        adapted = copy.copy(self)
        adapted.memory_bank = torch.cat([self.memory_bank, added]).contiguous()
        adapted.bank_sources = torch.cat([self.bank_sources.cpu(), torch.full((len(added),), -1, dtype=torch.long)])
        adapted._index = None
        return adapted


SPEC = registry.register(registry.MethodSpec(
    name="patchcore", detector=PatchCore, settings=PatchCoreSettings, label="PatchCore", colour="C0",
    marker="o", linestyle="-",
    sweep_grid=lambda settings, backbone, image_size: {
        "coreset_ratio": [0.01, 0.1], "k": [1, 9], "image_size": [image_size, 256],
        "stages": [list(default_stages(backbone)), *[[s] for s in default_stages(backbone)],
                   list(backbones.spec(backbone).stage_names[0:2])]}))
