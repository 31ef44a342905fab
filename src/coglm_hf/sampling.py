"""Samplers of CogView2 and the LoPAR schedule of iterative super-resolution.

* `cluster_sample` — the cluster sampler of stage 1 and direct super-resolution, vectorised
  over any number of positions; `ClusterSamplingLogitsProcessor` wraps it for `transformers` generation.
* `top_k_sample` — the per-position top-k sampler of the LoPAR passes.
* `lopar_order` / `lopar_regeneration_mask` — which cells each LoPAR pass regenerates.

Every sampler upcasts logits to fp32, takes its randomness only from an optional `torch.Generator` (which must live
on the device of the logits) and has an exact argmax mode, so runs can be made fully deterministic.

This file ships with converted checkpoints (remote code): it imports nothing beyond ``torch`` and ``transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

# Order matrix of the official iterative super-resolution, tiled over the grid as M[r mod 6][c mod 6]. Pass t
# (1-based) regenerates every cell with M >= t; cells with M <= 0 keep their direct-SR token.
LOPAR_ORDER_MATRIX: tuple[tuple[int, ...], ...] = (
    (-1, 0, 1, 2, 3, 4),
    (0, -1, 2, -1, -2, 5),
    (1, -2, 3, 4, 5, 6),
    (2, 3, 4, 5, -1, 1),
    (3, -1, -2, 0, -1, 2),
    (4, 5, 6, 1, 3, -2),
)
# Top-k of each LoPAR pass (the official list is [60, 40, 40, 40, 20, 20, 10] indexed by pass 1..6; 60 is unused).
LOPAR_TOP_K: tuple[int, ...] = (40, 40, 40, 20, 20, 10)
LOPAR_NUM_PASSES: int = 6


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (fp32, fp16 or bf16), got {logits.dtype}.")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., vocab] with vocab >= 1, got {tuple(logits.shape)}.")
    # -inf marks excluded ids; NaN, +inf or a row with nothing left would make every sampler (argmax included)
    # return garbage silently
    if logits.numel() and not logits.is_meta and not torch.compiler.is_compiling() and bool((logits.isnan() | logits.isposinf()).any() | logits.isneginf().all(-1).any()):
        raise ValueError("logits contain NaN or +inf (or a row that is all -inf): the model produced non-finite "
                         "values; check its weights, and in float16 try bfloat16 or float32.")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ValueError(
            f"The generator is on {gen_device} but the logits are on {device}; create it on the same device, e.g. "
            f"torch.Generator(device='{device}').manual_seed(seed)."
        )


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_temperature(name: str, value: float, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0 (0 means argmax)" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}.")


def _prepare_cluster_labels(
    cluster_labels: torch.Tensor, num_clusters: int | None, device: torch.device | str
) -> tuple[torch.Tensor, int]:
    """Validate the token → cluster table; returns (long labels on `device`, number of clusters)."""
    if not isinstance(cluster_labels, torch.Tensor):
        raise TypeError(f"cluster_labels must be a 1-D integer torch.Tensor, got {type(cluster_labels).__name__}.")
    if cluster_labels.ndim != 1 or cluster_labels.numel() == 0 or cluster_labels.is_floating_point():
        raise ValueError(
            f"cluster_labels must be a non-empty 1-D integer tensor (one cluster id per image token), got shape "
            f"{tuple(cluster_labels.shape)} and dtype {cluster_labels.dtype}."
        )
    labels = cluster_labels.to(device=device, dtype=torch.long)
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"cluster_labels must be >= 0, found {low}.")
    if num_clusters is None:
        num_clusters = high + 1
    elif isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters <= high:
        raise ValueError(f"num_clusters must be an integer > max(cluster_labels) = {high}, got {num_clusters!r}.")
    return labels, num_clusters


def _check_vocab(vocab: int, num_image_tokens: int) -> None:
    if vocab < num_image_tokens:
        raise ValueError(
            f"logits have {vocab} columns but cluster_labels covers {num_image_tokens} image tokens; pass the logits "
            "of all image tokens (ids 0 … len(cluster_labels) - 1)."
        )


def cluster_members(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each cluster, padded: `members` [C, S] (ascending ids, padding 0) and `valid` [C, S] bool.

    Sampling inside a cluster then only touches its S ≤ max cluster size tokens instead of the whole vocabulary.
    Callers that sample many times with one table (the scheduler) compute this once and pass it to
    :func:`cluster_sample` as ``members``.
    """
    sizes = torch.bincount(labels, minlength=num_clusters)
    order = torch.argsort(labels, stable=True)  # grouped by cluster, ascending token id inside a cluster
    starts = torch.cumsum(sizes, 0) - sizes
    width = max(int(sizes.max()), 1)
    slot = torch.arange(width, device=labels.device)
    valid = slot.unsqueeze(0) < sizes.unsqueeze(1)
    flat = (starts.unsqueeze(1) + slot.unsqueeze(0)).clamp(max=labels.numel() - 1)
    members = torch.where(valid, order[flat], torch.zeros_like(flat))
    return members, valid


def _select_clusters(
    tempered: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int,
    top_k_clusters: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The official cluster sampler after tempering, on logits [R, V]: cluster masses, top-k clusters, draw one; returns [R] ids."""
    probs = torch.softmax(tempered, dim=-1)
    masses = probs.new_zeros(probs.shape[0], num_clusters).index_add_(1, labels, probs)
    k = min(top_k_clusters, num_clusters)
    if k == 1:
        return masses.argmax(dim=-1)
    top_masses, top_ids = masses.topk(k, dim=-1)
    pick = torch.multinomial(top_masses, 1, generator=generator)
    return top_ids.gather(-1, pick).squeeze(-1)


def cluster_sample(
    logits: torch.Tensor,
    cluster_labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k_clusters: int = 16,
    cluster_temperature: float = 1.0,
    num_clusters: int | None = None,
    generator: torch.Generator | None = None,
    members: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.LongTensor:
    r"""Cluster sampling of CogView2 stage 1 and direct super-resolution, for every position at once.

    For each row z of `logits` (fp32): z ← z / `temperature`; p = softmax(z); cluster masses P_c = Σ_{label(i)=c} p_i;
    keep the `top_k_clusters` clusters of largest mass and draw one, c*, with probability ∝ P_c; draw the token
    from softmax(z / `cluster_temperature`) restricted to the tokens of c*.

    Exact argmax mode: `top_k_clusters=1` takes c* = argmax_c P_c without drawing, and `cluster_temperature=0` takes
    the token argmax_{i in c*} of the raw logits (lowest id on ties). Both together are deterministic and equal the
    rule of the official deterministic end-to-end run.

    Args:
        logits: `[..., V]` float logits (any leading shape, e.g. `[B, V]` for stage 1 or `[B, 3600, V]` for direct
            SR; fp16/bf16 are upcast). Only the first `len(cluster_labels)` columns (the image ids) can be drawn;
            further columns (e.g. text ids of a full-vocabulary head) are ignored, as in the official code which
            fills them with -65504.
        cluster_labels: `[V_img]` integer tensor, the cluster id of every image token (`cluster_label.npy`).
        temperature: > 0, divides the logits before the cluster masses are computed. (A zero temperature has no
            meaning for masses; use `top_k_clusters=1` for a deterministic cluster choice.)
        top_k_clusters: number of most probable clusters to draw from (clipped to the number of clusters).
        cluster_temperature: >= 0, temperature of the draw inside the chosen cluster, applied on top of
            `temperature`; 0 means argmax.
        num_clusters: number of clusters; defaults to `max(cluster_labels) + 1`.
        generator: source of randomness, on the device of `logits`.
        members: the precomputed :func:`cluster_members` of `cluster_labels` (saves recomputing it per call).

    Returns:
        `LongTensor` of shape `logits.shape[:-1]` with image token ids in `[0, V_img)`.
    """
    _check_logits(logits)
    _check_positive_int("top_k_clusters", top_k_clusters)
    _check_temperature("temperature", temperature, allow_zero=False)
    _check_temperature("cluster_temperature", cluster_temperature, allow_zero=True)
    _check_generator(generator, logits.device)
    labels, num_clusters = _prepare_cluster_labels(cluster_labels, num_clusters, logits.device)
    _check_vocab(logits.shape[-1], labels.numel())

    raw = logits[..., : labels.numel()].reshape(-1, labels.numel()).float()
    tempered = raw / temperature
    cluster = _select_clusters(tempered, labels, num_clusters, top_k_clusters, generator)

    members, valid = cluster_members(labels, num_clusters) if members is None else members
    candidates = members[cluster]  # [R, S] token ids of the chosen cluster of each row
    outside = ~valid[cluster]
    if cluster_temperature == 0:
        pick = raw.gather(1, candidates).masked_fill(outside, float("-inf")).argmax(dim=-1, keepdim=True)
    else:
        inner = (tempered.gather(1, candidates) / cluster_temperature).masked_fill(outside, float("-inf"))
        pick = torch.multinomial(torch.softmax(inner, dim=-1), 1, generator=generator)
    return candidates.gather(1, pick).view(logits.shape[:-1])


def top_k_sample(
    logits: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    r"""Top-k sampling of the LoPAR passes, for every position at once.

    z = logits / `temperature` (fp32); every z below the k-th largest becomes -inf (ties with the k-th value are
    kept, as in the official code); the token is drawn from softmax(z). `top_k=1` or `temperature=0` is the exact
    argmax of the logits (lowest id on ties), without randomness.

    Args:
        logits: `[..., V]` float logits (fp16/bf16 are upcast).
        top_k: number of largest logits to keep (clipped to V).
        temperature: >= 0; 0 means argmax.
        generator: source of randomness, on the device of `logits`.

    Returns:
        `LongTensor` of shape `logits.shape[:-1]`.
    """
    _check_logits(logits)
    _check_positive_int("top_k", top_k)
    _check_temperature("temperature", temperature, allow_zero=True)
    _check_generator(generator, logits.device)

    z = logits.reshape(-1, logits.shape[-1]).float()
    k = min(top_k, z.shape[-1])
    if k == 1 or temperature == 0:
        return z.argmax(dim=-1).view(logits.shape[:-1])
    values, ids = _top_k_with_ties(z / temperature, k)
    pick = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
    return ids.gather(1, pick).view(logits.shape[:-1])


def _top_k_with_ties(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of `z` [R, V] plus every entry tied with the k-th (official top-k keeps
    ties, which are common with half-precision logits). Returns (values, ids) `[R, W]`, W >= k, with -inf in the
    columns a row does not keep."""
    vocab = z.shape[-1]
    width = k
    while True:
        values, ids = z.topk(min(width + 1, vocab), dim=-1)
        threshold = values[:, k - 1 : k]
        if values.shape[-1] <= width or not bool((values[:, width] == threshold[:, 0]).any()):
            break
        width *= 2  # some row has more ties than fit: widen and retry (rare)
    values, ids = values[:, :width], ids[:, :width]
    return values.masked_fill(values < threshold, float("-inf")), ids


class ClusterSamplingLogitsProcessor(LogitsProcessor):
    r"""[`~transformers.LogitsProcessor`] form of [`cluster_sample`] for `model.generate(logits_processor=...)`.

    Each call draws a cluster per row (temperature, top-k clusters, `generator`) and returns fp32 scores that are
    `logits / (temperature · cluster_temperature)` on the tokens of that cluster and -inf elsewhere (also on every
    id >= len(cluster_labels), i.e. text and special ids). Multinomial sampling of these scores (`do_sample=True`)
    is then the official within-cluster draw, and greedy decoding takes the argmax inside the cluster. With
    `cluster_temperature=0` only the argmax token of the cluster stays finite, so both decoding modes return it.

    Use it with `do_sample=True, top_k=0` (or `do_sample=False`): generation's own default warpers (e.g. top-k 50)
    would otherwise cut into the cluster. The token draw uses generation's random state, the cluster draw
    `generator`.

    Args:
        cluster_labels: `[V_img]` integer tensor of cluster ids of the image tokens.
        temperature, top_k_clusters, cluster_temperature, num_clusters: as in [`cluster_sample`].
        generator: source of randomness for the cluster draw, on the device of the scores.
    """

    def __init__(
        self,
        cluster_labels: torch.Tensor,
        temperature: float = 1.0,
        top_k_clusters: int = 16,
        cluster_temperature: float = 1.0,
        num_clusters: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_positive_int("top_k_clusters", top_k_clusters)
        _check_temperature("temperature", temperature, allow_zero=False)
        _check_temperature("cluster_temperature", cluster_temperature, allow_zero=True)
        self.cluster_labels, self.num_clusters = _prepare_cluster_labels(cluster_labels, num_clusters, "cpu")
        self.temperature = temperature
        self.top_k_clusters = top_k_clusters
        self.cluster_temperature = cluster_temperature
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` `[B, V]` (V >= len(cluster_labels)) → fp32 `[B, V]` with -inf outside the drawn clusters."""
        _check_logits(scores)
        _check_generator(self.generator, scores.device)
        num_image = self.cluster_labels.numel()
        _check_vocab(scores.shape[-1], num_image)
        if self.cluster_labels.device != scores.device:
            self.cluster_labels = self.cluster_labels.to(scores.device)
        labels = self.cluster_labels
        raw = scores[..., :num_image].float()
        tempered = raw / self.temperature
        cluster = _select_clusters(tempered, labels, self.num_clusters, self.top_k_clusters, self.generator)
        outside = labels.unsqueeze(0) != cluster.unsqueeze(-1)
        if self.cluster_temperature == 0:
            best = raw.masked_fill(outside, float("-inf")).argmax(dim=-1, keepdim=True)
            outside = torch.ones_like(outside).scatter_(1, best, False)
            kept = tempered
        else:
            kept = tempered / self.cluster_temperature
        processed = torch.full(scores.shape, float("-inf"), dtype=torch.float32, device=scores.device)
        processed[..., :num_image] = kept.masked_fill(outside, float("-inf"))
        return processed


def _order_tensor(order_matrix: Sequence[Sequence[int]], device: torch.device | str | None) -> torch.Tensor:
    try:
        matrix = torch.tensor(order_matrix, dtype=torch.long, device=device)
    except (TypeError, ValueError) as error:
        raise ValueError(f"order_matrix must be a rectangular matrix of integers: {error}") from None
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(f"order_matrix must be a non-empty 2-D matrix, got shape {tuple(matrix.shape)}.")
    if int(matrix.max()) < 1:
        raise ValueError("order_matrix must contain at least one value >= 1 (otherwise no pass regenerates a cell).")
    return matrix


def lopar_num_passes(order_matrix: Sequence[Sequence[int]] = LOPAR_ORDER_MATRIX) -> int:
    """Number of LoPAR passes of an order matrix: its largest value (6 for the official matrix)."""
    return int(_order_tensor(order_matrix, None).max())


def lopar_order(
    grid_rows: int,
    grid_cols: int,
    order_matrix: Sequence[Sequence[int]] = LOPAR_ORDER_MATRIX,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """The order matrix tiled over a grid: `[grid_rows, grid_cols]` with entry `M[r mod m][c mod n]`.

    Grids that are not a multiple of the matrix size are covered by tiling and cropping.
    """
    _check_positive_int("grid_rows", grid_rows)
    _check_positive_int("grid_cols", grid_cols)
    matrix = _order_tensor(order_matrix, device)
    reps = (-(-grid_rows // matrix.shape[0]), -(-grid_cols // matrix.shape[1]))
    return matrix.repeat(*reps)[:grid_rows, :grid_cols]


def lopar_regeneration_mask(
    grid_rows: int,
    grid_cols: int,
    pass_index: int,
    input_mask: torch.Tensor | None = None,
    order_matrix: Sequence[Sequence[int]] = LOPAR_ORDER_MATRIX,
) -> torch.BoolTensor:
    """Cells regenerated by LoPAR pass `pass_index` (1-based): order value >= `pass_index`, within `input_mask`.

    Args:
        grid_rows, grid_cols: grid size (60 × 60 in CogView2).
        pass_index: 1 … number of passes (6 for the official matrix).
        input_mask: optional bool `[..., grid_rows, grid_cols]`, True where cells may change (text-guided editing);
            the result broadcasts to its shape and lives on its device.
        order_matrix: the order matrix (default: the official 6 × 6 one).

    Returns:
        `BoolTensor` `[grid_rows, grid_cols]` (or the shape of `input_mask`).
    """
    num_passes = lopar_num_passes(order_matrix)
    if isinstance(pass_index, bool) or not isinstance(pass_index, int) or not 1 <= pass_index <= num_passes:
        raise ValueError(f"pass_index must be an integer in 1 … {num_passes}, got {pass_index!r}.")
    device = input_mask.device if isinstance(input_mask, torch.Tensor) else None
    mask = lopar_order(grid_rows, grid_cols, order_matrix, device=device) >= pass_index
    if input_mask is None:
        return mask
    if not isinstance(input_mask, torch.Tensor) or input_mask.dtype != torch.bool:
        raise TypeError("input_mask must be a bool torch.Tensor (True = the cell may be regenerated).")
    if input_mask.ndim < 2 or tuple(input_mask.shape[-2:]) != (grid_rows, grid_cols):
        raise ValueError(
            f"input_mask must have shape [..., {grid_rows}, {grid_cols}], got {tuple(input_mask.shape)}; reshape a "
            f"flat mask with .view(-1, {grid_rows}, {grid_cols})."
        )
    return mask & input_mask
