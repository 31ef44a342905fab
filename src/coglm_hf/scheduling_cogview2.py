"""CogView2Scheduler: the sampling rules of the three CogView2 stages in one diffusers component.

Stage 1 and direct super-resolution use cluster sampling over the VQ codebook's clusters,
iterative super-resolution uses the LoPAR schedule with per-pass top-k sampling. The scheduler holds the
cluster labels (saved as a list in ``scheduler_config.json``), the official sampler defaults, the official style
recipes and the LoPAR order matrix; the pipeline asks it for tokens.

Ships with converted pipelines (remote code): imports only ``torch``, ``diffusers`` and ``.sampling``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .sampling import (
    LOPAR_ORDER_MATRIX,
    LOPAR_TOP_K,
    _check_positive_int,
    _check_temperature,
    _prepare_cluster_labels,
    cluster_members,
    cluster_sample,
    lopar_num_passes,
    lopar_regeneration_mask,
    top_k_sample,
)

# Sampler overrides of the official style recipes. Styles missing a knob use the scheduler's value. The
# recipes of "flat" and "comics" also set temp_all_itersr=1 and topk_itersr=5, which the official code never reads
# (dead knobs); they are deliberately not applied, see `CogView2Scheduler.sampler_settings`.
STYLE_SAMPLER_OVERRIDES: dict[str, dict[str, float | int]] = {
    "none": {},
    "mainbody": {},
    "photo": {},
    "flat": {"temperature": 1.1, "dsr_top_k_clusters": 5, "dsr_cluster_temperature": 0.4},
    "comics": {"temperature": 1.1, "dsr_top_k_clusters": 5, "dsr_cluster_temperature": 0.4},
    "oil": {},
    "sketch": {"temperature": 1.1},
    "isometric": {"temperature": 1.1},
    "chinese": {"temperature": 1.12},
    "watercolor": {},
}

SAMPLER_KNOBS: tuple[str, ...] = (
    "temperature",
    "top_k_clusters",
    "cluster_temperature",
    "dsr_temperature",
    "dsr_top_k_clusters",
    "dsr_cluster_temperature",
    "itersr_top_k",
    "itersr_temperature",
)


class CogView2Scheduler(SchedulerMixin, ConfigMixin):
    r"""Sampling rules of CogView2: cluster sampling (stage 1, direct SR) and the LoPAR schedule (iterative SR).

    Defaults are the *effective* values of the official code. The official recipe also lists `temp_all_dsr=1.5` and
    `temp_all_itersr=1.3`, but the DSR and iterative-SR loops always pass temperature 1, so both stages run at 1.0
    here; `topk_itersr` is overwritten by the per-pass schedule `itersr_top_k`.

    Args:
        cluster_labels (`list[int]`, *optional*):
            Cluster id of every image token (`cluster_label.npy`: 20000 tokens, 500 clusters). Required for
            `sample_stage1`/`sample_dsr`; can be set later with `set_cluster_labels`. Stored as `self.cluster_labels`
            (a `LongTensor`) and saved as a list.
        num_clusters (`int`, *optional*):
            Number of clusters; defaults to `max(cluster_labels) + 1`.
        temperature (`float`, defaults to 1.15):
            Stage 1: temperature of the cluster masses (`temp_all_gen`).
        top_k_clusters (`int`, defaults to 16):
            Stage 1: number of most probable clusters to draw from (`topk_gen`).
        cluster_temperature (`float`, defaults to 1.0):
            Stage 1: extra temperature inside the drawn cluster (`temp_cluster_gen`); 0 means argmax.
        dsr_temperature (`float`, defaults to 1.0):
            Direct SR: temperature of the cluster masses (effective official value).
        dsr_top_k_clusters (`int`, defaults to 100):
            Direct SR: clusters to draw from (`topk_dsr`).
        dsr_cluster_temperature (`float`, defaults to 0.89):
            Direct SR: temperature inside the drawn cluster (`temp_cluster_dsr`); 0 means argmax.
        itersr_top_k (`list[int]`, defaults to `[40, 40, 40, 20, 20, 10]`):
            Iterative SR: top-k of each LoPAR pass (one value per pass).
        itersr_temperature (`float`, defaults to 1.0):
            Iterative SR: temperature of every pass (effective official value); 0 means argmax.
        lopar_order_matrix (`list[list[int]]`, defaults to the official 6×6 matrix):
            Tiled over the grid; pass t regenerates the cells whose value is >= t. The number of passes is its
            largest value.
    """

    @register_to_config
    def __init__(
        self,
        cluster_labels: Sequence[int] | None = None,
        num_clusters: int | None = None,
        temperature: float = 1.15,
        top_k_clusters: int = 16,
        cluster_temperature: float = 1.0,
        dsr_temperature: float = 1.0,
        dsr_top_k_clusters: int = 100,
        dsr_cluster_temperature: float = 0.89,
        itersr_top_k: Sequence[int] = LOPAR_TOP_K,
        itersr_temperature: float = 1.0,
        lopar_order_matrix: Sequence[Sequence[int]] = LOPAR_ORDER_MATRIX,
    ) -> None:
        num_passes = lopar_num_passes(lopar_order_matrix)
        self._validate_knobs(
            {
                "temperature": temperature,
                "top_k_clusters": top_k_clusters,
                "cluster_temperature": cluster_temperature,
                "dsr_temperature": dsr_temperature,
                "dsr_top_k_clusters": dsr_top_k_clusters,
                "dsr_cluster_temperature": dsr_cluster_temperature,
                "itersr_top_k": self._per_pass_top_k(itersr_top_k, num_passes),
                "itersr_temperature": itersr_temperature,
            }
        )
        # Plain lists so that scheduler_config.json round-trips.
        self.register_to_config(
            itersr_top_k=list(self._per_pass_top_k(itersr_top_k, num_passes)),
            lopar_order_matrix=[[int(v) for v in row] for row in lopar_order_matrix],
        )
        self.cluster_labels: torch.LongTensor | None = None
        self._labels_on_device: torch.LongTensor | None = None
        self._members_on_device: tuple[torch.Tensor, torch.Tensor] | None = None
        if cluster_labels is not None:
            self.set_cluster_labels(cluster_labels, num_clusters)

    # ----------------------------------------------------------------------------------------------- configuration

    def set_cluster_labels(self, cluster_labels: Sequence[int] | torch.Tensor, num_clusters: int | None = None) -> None:
        """Set the token → cluster table (list, numpy array or 1-D integer tensor); updates the config too."""
        try:
            labels = torch.as_tensor(cluster_labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"cluster_labels must be a 1-D sequence of integers: {error}") from None
        labels, num_clusters = _prepare_cluster_labels(labels, num_clusters, "cpu")
        self.cluster_labels = labels
        self._labels_on_device = None
        self._members_on_device = None
        self.register_to_config(cluster_labels=labels.tolist(), num_clusters=num_clusters)

    @property
    def styles(self) -> tuple[str, ...]:
        """Names accepted by `sampler_settings` (the official `--style` choices)."""
        return tuple(STYLE_SAMPLER_OVERRIDES)

    @property
    def num_lopar_passes(self) -> int:
        """Number of LoPAR passes (largest value of the order matrix; 6)."""
        return lopar_num_passes(self.config.lopar_order_matrix)

    def sampler_settings(self, style: str = "mainbody", **overrides: Any) -> dict[str, Any]:
        """Effective sampler knobs for a style: scheduler config < style recipe < explicit `overrides`.

        `overrides` take the knob names of `SAMPLER_KNOBS`; `None` values are ignored, so a pipeline can forward all
        its arguments. `itersr_top_k` may be one int (used for every pass) or one value per pass.

        The official "flat"/"comics" recipes also set `temp_all_itersr=1` and `topk_itersr=5`, which the official
        code never reads: iterative SR always runs at temperature 1 with the per-pass top-k 40, 40, 40, 20, 20, 10.
        They are not applied here, so every style reproduces the official outputs; the temperature override would
        not change anything anyway (1 is the effective value), and a single top-k of 5 was never used by the
        authors with the LoPAR schedule. Pass `itersr_top_k=5` to get it.

        Returns:
            `dict` with every knob of `SAMPLER_KNOBS`; `itersr_top_k` is a tuple with one value per pass.
        """
        if style not in STYLE_SAMPLER_OVERRIDES:
            raise ValueError(f"Unknown style {style!r}; valid styles are: {', '.join(self.styles)}.")
        unknown = sorted(set(overrides) - set(SAMPLER_KNOBS))
        if unknown:
            raise ValueError(f"Unknown sampler setting(s) {unknown}; valid ones are: {', '.join(SAMPLER_KNOBS)}.")
        settings = {name: self.config[name] for name in SAMPLER_KNOBS}
        settings.update(STYLE_SAMPLER_OVERRIDES[style])
        settings.update({name: value for name, value in overrides.items() if value is not None})
        settings["itersr_top_k"] = self._per_pass_top_k(settings["itersr_top_k"], self.num_lopar_passes)
        self._validate_knobs(settings)
        return settings

    @staticmethod
    def _per_pass_top_k(top_k: int | Sequence[int], num_passes: int) -> tuple[int, ...]:
        if isinstance(top_k, int) and not isinstance(top_k, bool):
            return (top_k,) * num_passes
        if isinstance(top_k, (str, bytes)) or not isinstance(top_k, Sequence):
            raise ValueError(f"itersr_top_k must be an int or a sequence of {num_passes} ints, got {top_k!r}.")
        if len(top_k) != num_passes:
            raise ValueError(f"itersr_top_k needs one value per LoPAR pass ({num_passes}), got {len(top_k)}.")
        return tuple(top_k)

    @staticmethod
    def _validate_knobs(settings: dict[str, Any]) -> None:
        for name in ("temperature", "dsr_temperature"):
            _check_temperature(name, settings[name], allow_zero=False)
        for name in ("cluster_temperature", "dsr_cluster_temperature", "itersr_temperature"):
            _check_temperature(name, settings[name], allow_zero=True)
        for name in ("top_k_clusters", "dsr_top_k_clusters"):
            _check_positive_int(name, settings[name])
        for k in settings["itersr_top_k"]:
            _check_positive_int("every itersr_top_k value", k)

    def _labels(self, device: torch.device) -> torch.LongTensor:
        if self.cluster_labels is None:
            raise ValueError(
                "This CogView2Scheduler has no cluster labels; construct it with cluster_labels=... or call "
                "set_cluster_labels(...) with the codebook's table (cluster_label.npy)."
            )
        if self._labels_on_device is None or self._labels_on_device.device != device:
            self._labels_on_device = self.cluster_labels.to(device)
            self._members_on_device = cluster_members(self._labels_on_device, self.config.num_clusters)
        return self._labels_on_device

    # ------------------------------------------------------------------------------------------------------ stages

    def sample_stage1(
        self,
        logits: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        top_k_clusters: int | None = None,
        cluster_temperature: float | None = None,
    ) -> torch.LongTensor:
        """Stage-1 cluster sampling of the next image token: `logits` `[B, V_img]` → `[B]` (any leading shape).

        Knobs left `None` come from the config. `top_k_clusters=1, cluster_temperature=0` is exact argmax.
        """
        return cluster_sample(
            logits,
            self._labels(logits.device),
            temperature=self.config.temperature if temperature is None else temperature,
            top_k_clusters=self.config.top_k_clusters if top_k_clusters is None else top_k_clusters,
            cluster_temperature=self.config.cluster_temperature if cluster_temperature is None else cluster_temperature,
            num_clusters=self.config.num_clusters,
            generator=generator,
            members=self._members_on_device,
        )

    def sample_dsr(
        self,
        logits: torch.Tensor,
        generator: torch.Generator | None = None,
        dsr_temperature: float | None = None,
        dsr_top_k_clusters: int | None = None,
        dsr_cluster_temperature: float | None = None,
    ) -> torch.LongTensor:
        """Direct-SR cluster sampling of all hi-res cells at once: `logits` `[B, N, V_img]` → `[B, N]`.

        Knobs left `None` come from the config.
        """
        return cluster_sample(
            logits,
            self._labels(logits.device),
            temperature=self.config.dsr_temperature if dsr_temperature is None else dsr_temperature,
            top_k_clusters=self.config.dsr_top_k_clusters if dsr_top_k_clusters is None else dsr_top_k_clusters,
            cluster_temperature=(
                self.config.dsr_cluster_temperature if dsr_cluster_temperature is None else dsr_cluster_temperature
            ),
            num_clusters=self.config.num_clusters,
            generator=generator,
            members=self._members_on_device,
        )

    def lopar_passes(
        self,
        grid_rows: int,
        grid_cols: int,
        input_mask: torch.Tensor | None = None,
        itersr_top_k: int | Sequence[int] | None = None,
    ) -> Iterator[tuple[int, torch.BoolTensor, int]]:
        """Yield `(pass_index, regenerate_mask, top_k)` for the LoPAR passes 1 … `num_lopar_passes`.

        `regenerate_mask` is `[grid_rows, grid_cols]` bool (or the shape of the bool `input_mask` `[..., rows,
        cols]`, which restricts the cells that may change). `itersr_top_k` overrides the configured per-pass top-k.
        """
        num_passes = self.num_lopar_passes
        top_ks = self._per_pass_top_k(self.config.itersr_top_k if itersr_top_k is None else itersr_top_k, num_passes)
        for k in top_ks:
            _check_positive_int("every itersr_top_k value", k)
        for pass_index, top_k in enumerate(top_ks, start=1):
            mask = lopar_regeneration_mask(
                grid_rows, grid_cols, pass_index, input_mask, order_matrix=self.config.lopar_order_matrix
            )
            yield pass_index, mask, top_k

    def sample_itersr(
        self,
        logits: torch.Tensor,
        top_k: int,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
    ) -> torch.LongTensor:
        """Top-k sampling of one LoPAR pass: `logits` `[..., V_img]` → `[...]`.

        Pass only the logits of the cells being regenerated (e.g. `logits[mask]`) to skip work on the others.
        `top_k=1` or `temperature=0` is exact argmax; `temperature` defaults to the config's `itersr_temperature`.
        """
        return top_k_sample(
            logits,
            top_k,
            temperature=self.config.itersr_temperature if temperature is None else temperature,
            generator=generator,
        )
